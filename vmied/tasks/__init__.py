"""Tasks and the catalog: the import (and export) engine behind the EC2 API (design §5)."""
