"""Where bytes come from (sources) and go to (sinks): local files here, S3 and https beside."""
