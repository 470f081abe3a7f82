"""Governance: identities, roles and purposes, audit trail, retention, public register."""
