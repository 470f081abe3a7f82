"""Governance: identities, roles and purposes, the audit trail, retention and the public register."""
