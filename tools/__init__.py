"""Developer tools that are not part of the library: regenerating the reference docs."""
