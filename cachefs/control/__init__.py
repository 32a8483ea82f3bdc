"""The control socket of a mount: locating a mount, the protocol, the server and the client."""
