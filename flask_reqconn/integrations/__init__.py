"""Integrations with other libraries, each through :func:`flask_reqconn.state_of` and listeners."""
