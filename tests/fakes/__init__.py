"""Fake provider APIs: real HTTP servers on 127.0.0.1 that speak the providers' wire formats."""
