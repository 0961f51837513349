"""The HTTP boundary of the server: the app, its routes, the request guard and middleware, errors, the document."""
