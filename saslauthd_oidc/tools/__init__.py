"""Operator and developer tools: the command line (cli), explain, auth-test
(authtest), dev mode (devmode) and the development issuer (devissuer)."""
