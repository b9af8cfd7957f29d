"""How to stand carefl up: the command line, and a local loopback deployment for the demo."""
