"""A model of the sm_90 shared-memory layouts the wgmma kernels rely on (128B swizzle, TMA tile placement, wgmma
shared-memory descriptors), for the CPU checks of both sm_90a kernels."""


def swizzle(addr):
    """128B swizzle as hardware applies it: address bits [4, 7) XOR bits [7, 10)."""
    return addr ^ (((addr >> 7) & 7) << 4)


def decode(desc):
    assert desc >> 62 == 1, "128B swizzle mode expected"
    return (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4


def tma_addr(tile_base, subtile_rows, row, col):
    """Where TMA (box of 64 columns, 128B swizzle) puts element (row, col) of a tile stored as subtiles of 64
    columns: subtile col // 64, row `row`, 16-byte chunk (col % 64) // 8, element col % 8."""
    return swizzle(tile_base + (col // 64) * subtile_rows * 128 + row * 128 + ((col % 64) // 8) * 16) + 2 * (col % 8)
