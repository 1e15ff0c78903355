"""decoders."""
from vlzoo.decoders.box import BoxDecoder, BoxEncoder, box_cycle_losses, box_losses  # noqa: E402,F401
