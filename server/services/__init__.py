"""gRPC servicers: validate, call the domain, convert."""
