"""Loopback stand-ins for remote model providers, speaking their real wire formats."""
