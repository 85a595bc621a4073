"""How clients connect: the ASGI entry for WebSockets (``entry``), the consumer that reads
frames (``consumers``), Server-Sent Events (``sse``), the connection both share
(``connection``), the origin and proxy checks (``origin``), and the server adapters that
write frames straight to the socket (``server_adapters``)."""
