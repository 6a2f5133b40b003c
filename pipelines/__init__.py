"""One module per stage; each turns a stage config plus input URIs into output URIs on Ray."""
