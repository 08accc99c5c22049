"""Registry mapping Keras layers to curvature block types."""

_BLOCK_TYPES = []


def register_block(block_type):
    """Class decorator: make ``block_type`` handle the layers it ``matches``.

    Later registrations take precedence, so a user block can override a
    built-in one for the layers it claims.
    """
    if block_type not in _BLOCK_TYPES:
        _BLOCK_TYPES.insert(0, block_type)
    return block_type


def block_type_for(layer):
    """The block type handling ``layer``, or ``None``."""
    for block_type in _BLOCK_TYPES:
        if block_type.matches(layer):
            return block_type
    return None
