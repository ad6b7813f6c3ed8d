"""Where the fused AttnRes mix op applies (placeholder: the torch reference runs everywhere)."""


def usable(sources, query, like) -> bool:
    return False


def mix(sources, query, key_norm, *, eps, scale, out_dtype):
    raise NotImplementedError
