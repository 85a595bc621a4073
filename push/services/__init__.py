"""What the transports and the REST API ask for, decided in one place: publishing
(``publishing``) and subscribing (``subscriptions``)."""
