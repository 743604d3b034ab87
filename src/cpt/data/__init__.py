"""Text data: the record format, source readers, normalisation, quality filters, dedup, decontamination, the
checks validate runs, and packing text into token blocks. Used by the ingest, clean, validate and shards stages."""
