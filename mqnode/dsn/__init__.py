"""Delivery status notifications: who hears of an outcome (`notify`), the RFC 3464 `report`."""
