"""Credential checks: the Authenticator interface, the methods (dev, jwt, apikey, agent) and the chain that picks one by the token's form."""
