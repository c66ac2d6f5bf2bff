"""The RemotePredict op: Python API, kernel, pluggable stubs, and graph compatibility."""
