"""Jobs: one short file per command that writes a folder, on top of the library below."""
