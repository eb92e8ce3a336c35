"""Metering gateway for AI APIs: exact credits, atomic Redis reservations, official-SDK drop-in."""

__version__ = "0.1.0"
