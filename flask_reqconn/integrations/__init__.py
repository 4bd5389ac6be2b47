"""Integrations of flask-reqconn with other libraries, each behind its optional extra."""
