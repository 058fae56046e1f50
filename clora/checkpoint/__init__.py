"""What clora writes to disk and reads back: tenant checkpoints (format and compatibility checks)
and atomic file and folder writing."""
