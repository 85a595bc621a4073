"""The node and its place in the cluster: the node runtime and its background loops
(``node``), where messages cross nodes (``broker``), the directory of live nodes
(``directory``), presence, the connection registry, and broadcasting a committed message
from anywhere (``broadcast``)."""
