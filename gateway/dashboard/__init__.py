"""The web dashboard at /dashboard: its page (static/), its sign-in cookie and its live feed."""
