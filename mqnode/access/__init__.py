"""Access: principals, roles, and which role each HTTP route needs."""
