#!/usr/bin/env python3
"""Test vectors for Cleanroom's ecdh matching, from a second implementation.

This is an independent, slow, pure-Python ristretto255 written from
RFC 9496 (sections 4.3 and 4.4), with BLAKE3 from the `blake3` package.
It first checks itself against the RFC's own vectors (appendix A.1,
multiples of the generator; appendix A.3, the one-way map), then writes
`tests/vectors/ecdh.toml`: for fixed scalars and a fixed salt, the wide
hash, the point H(v), a*H(v), b*H(v) and the doubly blinded a*b*H(v) of a
few identifiers. The Rust test `vectors_from_the_python_implementation`
(src/identity/blinding.rs) checks the product's code against that file.

    python3 -m venv /tmp/v && /tmp/v/bin/pip install blake3==1.0.11
    /tmp/v/bin/python docs/vectors/ecdh_vectors.py > tests/vectors/ecdh.toml
"""

import sys

import blake3

HASH_CONTEXT = "cleanroom 2026-11-25 ristretto255 identifier v1"

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = (-121665 * pow(121666, P - 2, P)) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)


def is_negative(x):
    return (x % P) & 1 == 1


def ct_abs(x):
    return (-x) % P if is_negative(x) else x % P


def sqrt_ratio_m1(u, v):
    """RFC 9496 section 4.2: (was_square, the non-negative root of u/v or of SQRT_M1*u/v)."""
    u, v = u % P, v % P
    r = (u * pow(v, 3, P)) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    check = v * r * r % P
    correct = check == u
    flipped = check == (-u) % P
    flipped_i = check == (-u * SQRT_M1) % P
    if flipped or flipped_i:
        r = r * SQRT_M1 % P
    return correct or flipped, ct_abs(r)


# The RFC fixes the negative root here and the non-negative one below.
SQRT_AD_MINUS_ONE = P - sqrt_ratio_m1(-D - 1, 1)[1]
INVSQRT_A_MINUS_D = sqrt_ratio_m1(1, -1 - D)[1]
ONE_MINUS_D_SQ = (1 - D * D) % P
D_MINUS_ONE_SQ = (D - 1) * (D - 1) % P

# The RFC's decimal constants (section 4.1), to catch a wrong root above.
assert SQRT_AD_MINUS_ONE == 25063068953384623474111414158702152701244531502492656460079210482610430750235
assert INVSQRT_A_MINUS_D == 54469307008909316920995813868745141605393597292927456921205312896311721017578

IDENTITY = (0, 1, 1, 0)


def add(p1, p2):
    """Extended twisted Edwards coordinates, a = -1."""
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = t1 * 2 * D * t2 % P
    d = z1 * 2 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def mul(k, point):
    k %= L
    out = IDENTITY
    while k:
        if k & 1:
            out = add(out, point)
        point = add(point, point)
        k >>= 1
    return out


def decode(data):
    s = int.from_bytes(data, "little")
    if s >= P or is_negative(s):
        raise ValueError("non-canonical")
    ss = s * s % P
    u1, u2 = (1 - ss) % P, (1 + ss) % P
    u2_sqr = u2 * u2 % P
    v = (-(D * u1 * u1) - u2_sqr) % P
    was_square, invsqrt = sqrt_ratio_m1(1, v * u2_sqr)
    den_x = invsqrt * u2 % P
    den_y = invsqrt * den_x * v % P
    x = ct_abs(2 * s * den_x)
    y = u1 * den_y % P
    t = x * y % P
    if not was_square or is_negative(t) or y == 0:
        raise ValueError("not a point")
    return (x, y, 1, t)


def encode(point):
    x0, y0, z0, t0 = point
    u1 = (z0 + y0) * (z0 - y0) % P
    u2 = x0 * y0 % P
    _, invsqrt = sqrt_ratio_m1(1, u1 * u2 * u2)
    den1, den2 = invsqrt * u1 % P, invsqrt * u2 % P
    z_inv = den1 * den2 * t0 % P
    if is_negative(t0 * z_inv):
        x, y, den_inv = y0 * SQRT_M1 % P, x0 * SQRT_M1 % P, den1 * INVSQRT_A_MINUS_D % P
    else:
        x, y, den_inv = x0, y0, den2
    if is_negative(x * z_inv):
        y = -y
    return ct_abs(den_inv * (z0 - y)).to_bytes(32, "little")


def elligator(t):
    r = SQRT_M1 * t * t % P
    u = (r + 1) * ONE_MINUS_D_SQ % P
    v = (-1 - r * D) * (r + D) % P
    was_square, s = sqrt_ratio_m1(u, v)
    if not was_square:
        s = (-ct_abs(s * t)) % P
    c = P - 1 if was_square else r
    n = (c * (r - 1) * D_MINUS_ONE_SQ - v) % P
    w0, w1 = 2 * s * v % P, n * SQRT_AD_MINUS_ONE % P
    w2, w3 = (1 - s * s) % P, (1 + s * s) % P
    return (w0 * w3 % P, w2 * w1 % P, w1 * w3 % P, w0 * w2 % P)


def one_way_map(wide):
    assert len(wide) == 64
    halves = [int.from_bytes(wide[i : i + 32], "little") & ((1 << 255) - 1) for i in (0, 32)]
    return add(elligator(halves[0] % P), elligator(halves[1] % P))


def wide_hash(salt, kind, value):
    h = blake3.blake3(derive_key_context=HASH_CONTEXT)
    h.update(salt)
    h.update(len(kind.encode()).to_bytes(4, "little"))
    h.update(kind.encode())
    h.update(value.encode())
    return h.digest(length=64)


# RFC 9496 appendix A.1: encodings of 0*B .. 15*B.
MULTIPLES = """
0000000000000000000000000000000000000000000000000000000000000000
e2f2ae0a6abc4e71a884a961c500515f58e30b6aa582dd8db6a65945e08d2d76
6a493210f7499cd17fecb510ae0cea23a110e8d5b901f8acadd3095c73a3b919
94741f5d5d52755ece4f23f044ee27d5d1ea1e2bd196b462166b16152a9d0259
da80862773358b466ffadfe0b3293ab3d9fd53c5ea6c955358f568322daf6a57
e882b131016b52c1d3337080187cf768423efccbb517bb495ab812c4160ff44e
f64746d3c92b13050ed8d80236a7f0007c3b3f962f5ba793d19a601ebb1df403
44f53520926ec81fbd5a387845beb7df85a96a24ece18738bdcfa6a7822a176d
903293d8f2287ebe10e2374dc1a53e0bc887e592699f02d077d5263cdd55601c
02622ace8f7303a31cafc63f8fc48fdc16e1c8c8d234b2f0d6685282a9076031
20706fd788b2720a1ed2a5dad4952b01f413bcf0e7564de8cdc816689e2db95f
bce83f8ba5dd2fa572864c24ba1810f9522bc6004afe95877ac73241cafdab42
e4549ee16b9aa03099ca208c67adafcafa4c3f3e4e5303de6026e3ca8ff84460
aa52e000df2e16f55fb1032fc33bc42742dad6bd5a8fc0be0167436c5948501f
46376b80f409b29dc2b5f6f0c52591990896e5716f41477cd30085ab7f10301e
e0c418f7c8d9c4cdd7395b93ea124f3ad99021bb681dfc3302a9d99a2e53e64e
""".split()

# RFC 9496 appendix A.3: the one-way map (input, output).
ONE_WAY_MAP = [
    ("5d1be09e3d0c82fc538112490e35701979d99e06ca3e2b5b54bffe8b4dc772c14d98b696a1bbfb5ca32c436cc61c16563790306c79eaca7705668b47dffe5bb6",
     "3066f82a1a747d45120d1740f14358531a8f04bbffe6a819f86dfe50f44a0a46"),
    ("f116b34b8f17ceb56e8732a60d913dd10cce47a6d53bee9204be8b44f6678b270102a56902e2488c46120e9276cfe54638286b9e4b3cdb470b542d46c2068d38",
     "f26e5b6f7d362d2d2a94c5d0e7602cb4773c95a2e5c31a64f133189fa76ed61b"),
    ("8422e1bbdaab52938b81fd602effb6f89110e1e57208ad12d9ad767e2e25510c27140775f9337088b982d83d7fcf0b2fa1edffe51952cbe7365e95c86eaf325c",
     "006ccd2a9e6867e6a2c5cea83d3302cc9de128dd2a9a57dd8ee7b9d7ffe02826"),
    ("ac22415129b61427bf464e17baee8db65940c233b98afce8d17c57beeb7876c2150d15af1cb1fb824bbd14955f2b57d08d388aab431a391cfc33d5bafb5dbbaf",
     "f8f0c87cf237953c5890aec3998169005dae3eca1fbb04548c635953c817f92a"),
    ("165d697a1ef3d5cf3c38565beefcf88c0f282b8e7dbd28544c483432f1cec7675debea8ebb4e5fe7d6f6e5db15f15587ac4d4d4a1de7191e0c1ca6664abcc413",
     "ae81e7dedf20a497e10c304a765c1767a42d6e06029758d2d7e8ef7cc4c41179"),
    ("a836e6c9a9ca9f1e8d486273ad56a78c70cf18f0ce10abb1c7172ddd605d7fd2979854f47ae1ccf204a33102095b4200e5befc0465accc263175485f0e17ea5c",
     "e2705652ff9f5e44d3e841bf1c251cf7dddb77d140870d1ab2ed64f1a9ce8628"),
    ("2cdc11eaeb95daf01189417cdddbf95952993aa9cb9c640eb5058d09702c74622c9965a697a3b345ec24ee56335b556e677b30e6f90ac77d781064f866a3c982",
     "80bd07262511cdde4863f8a7434cef696750681cb9510eea557088f76d9e5065"),
]


def self_check():
    base = decode(bytes.fromhex(MULTIPLES[1]))
    for i, want in enumerate(MULTIPLES):
        assert encode(mul(i, base)).hex() == want, f"multiple {i}"
        if i:
            assert encode(decode(bytes.fromhex(want))).hex() == want
    for wide, want in ONE_WAY_MAP:
        assert encode(one_way_map(bytes.fromhex(wide))).hex() == want, wide


def scalar(label):
    wide = blake3.blake3(label.encode()).digest(length=64)
    return int.from_bytes(wide, "little") % L


def main():
    self_check()
    salt = bytes(range(32))
    a, b = scalar("cleanroom vector scalar a"), scalar("cleanroom vector scalar b")
    identifiers = [
        ("email", "alice@example.com"),
        ("email", "zoë.o'neil+news@exämple.org"),
        ("phone", "+14155550100"),
        ("phone", ""),
        ("email", "x" * 300),
    ]
    out = sys.stdout
    out.write("# Made by docs/vectors/ecdh_vectors.py, a pure-Python ristretto255 written\n")
    out.write("# from RFC 9496 that first checks itself against the RFC's appendix A.1\n")
    out.write("# and A.3 vectors. Do not edit by hand: run the script.\n\n")
    out.write(f'salt = "{salt.hex()}"\n')
    out.write(f'a = "{a.to_bytes(32, "little").hex()}"\n')
    out.write(f'b = "{b.to_bytes(32, "little").hex()}"\n')
    for wide, point in ONE_WAY_MAP:
        out.write(f'\n[[one_way_map]]\nwide = "{wide}"\npoint = "{point}"\n')
    for kind, value in identifiers:
        wide = wide_hash(salt, kind, value)
        h = one_way_map(wide)
        ah, bh = mul(a, h), mul(b, h)
        double = mul(b, ah)
        assert encode(double) == encode(mul(a, bh))
        assert encode(decode(encode(ah))) == encode(ah)
        out.write("\n[[identifier]]\n")
        out.write(f'kind = "{kind}"\nvalue = "{value}"\n')
        out.write(f'wide = "{wide.hex()}"\n')
        out.write(f'point = "{encode(h).hex()}"\n')
        out.write(f'blinded_a = "{encode(ah).hex()}"\n')
        out.write(f'blinded_b = "{encode(bh).hex()}"\n')
        out.write(f'double = "{encode(double).hex()}"\n')


if __name__ == "__main__":
    main()
