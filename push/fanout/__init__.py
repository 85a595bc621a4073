"""One node's fan-out: a published message (``message``), the hub that hands it to every
local subscriber in seq order (``hub``), each connection's bounded outbox (``outbox``)
and the rate and slot limits they share (``limits``). Knows nothing of Redis or of other
nodes."""
