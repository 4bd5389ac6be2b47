"""Integrations with other libraries, each behind its optional extra; they reach the
library through :func:`flask_reqconn.state_of` and listeners."""
