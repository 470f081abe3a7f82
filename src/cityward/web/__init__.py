"""The operations room's web side: the dashboard's live stream (and, as issue 8 grows, its page)."""
