#!/usr/bin/env python3
"""make_avatars.py - data for NeuroFlow's "does Bob wear glasses?" demo (examples/glasses.flow).

Draws flat-coloured cartoon avatars (400x400 RGB PNG) in the ImageFolder layout:

    glasses/000.png ...    avatars wearing glasses
    noglasses/000.png ...  avatars without
    eyes.csv               per image: eye-region box and face box (see below)
    sheet.png              800x400 contact sheet: top row glasses, bottom row none

Only the eye region separates the classes. Every image gets its own random stream
(seeded from --seed, the class name and the index); the person (background, face position
and size, skin, hair, eyes, brows, nose, mouth, clothes) is drawn first, by the same code
for both classes, and only then are glasses drawn - for the glasses class only. Images are
NOT paired: glasses/007.png and noglasses/007.png are different people.

eyes.csv columns: class,file,x0,y0,x1,y1,fx0,fy0,fx1,fy1
    file             path relative to this folder, e.g. glasses/007.png
    x0,y0,x1,y1      eye region: both eye "sockets" together (the eyes padded by at least
                     ~10 px); glasses lenses, frames and bridge lie inside it (only the thin
                     temples run on sideways to the ears, within the same rows)
    fx0,fy0,fx1,fy1  bounding box of the face ellipse
    Pixel coordinates, x1/y1 exclusive: img[y0:y1, x0:x1] for a numpy HxWx3 array.

    python make_avatars.py [--out DIR] [--count N-per-class] [--seed S] [--check]
"""
import argparse
import csv
import math
import os
import random
import sys

from PIL import Image, ImageChops, ImageDraw

SIZE = 400          # output is SIZE x SIZE
SS = 2              # drawn at SS x SIZE, then box-reduced: smooth edges, still flat colours
CLASSES = ("glasses", "noglasses")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_COUNT = 200
DEFAULT_SEED = 1

BACKGROUNDS = [(198, 226, 255), (255, 236, 179), (200, 230, 201), (248, 200, 215), (225, 212, 245),
               (255, 224, 178), (178, 235, 242), (232, 236, 240), (255, 212, 205), (220, 237, 200)]
SKINS = [(255, 226, 200), (250, 210, 175), (241, 194, 150), (224, 172, 110), (200, 140, 80),
         (165, 108, 65), (128, 82, 50), (95, 62, 40)]
HAIRS = [(28, 24, 26), (60, 40, 30), (100, 66, 40), (150, 100, 55), (214, 178, 108),
         (238, 212, 150), (170, 75, 35), (140, 140, 145), (228, 228, 228)]
FUN_HAIRS = [(95, 75, 165), (220, 95, 145), (40, 140, 160)]
SHIRTS = [(52, 101, 164), (204, 40, 40), (78, 154, 6), (245, 121, 0), (117, 80, 123), (46, 52, 54),
          (237, 200, 0), (250, 250, 250), (32, 74, 135), (193, 125, 17), (0, 150, 136)]
IRISES = [(92, 58, 30), (60, 40, 20), (66, 120, 190), (80, 140, 90), (110, 110, 120), (40, 40, 40)]
FRAMES = [(20, 20, 20), (20, 20, 20), (62, 36, 20), (125, 72, 30), (175, 30, 40), (30, 60, 150),
          (200, 160, 60), (160, 165, 172), (40, 110, 90), (120, 40, 120)]
TINTS = [(40, 40, 50), (60, 110, 180), (120, 80, 40), (60, 140, 90), (200, 80, 130)]
DARK = (35, 30, 35)
WHITE = (255, 255, 255)


def mix(a, b, t):
    """Colour between a (t=0) and b (t=1)."""
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def jitter(rng, c, k):
    return tuple(max(0, min(255, v + rng.randint(-k, k))) for v in c)


# ------------------------------------------------------------------------------------ people
def sample_person(rng):
    """Every non-glasses attribute. Identical code (and so distribution) for both classes."""
    p = {}
    p["bg"] = jitter(rng, rng.choice(BACKGROUNDS), 8)
    p["bg2"] = mix(p["bg"], DARK, rng.uniform(0.05, 0.15)) if rng.random() < 0.5 else p["bg"]
    s = rng.uniform(0.9, 1.1)                                  # face size +-10%
    p["cx"] = 200 + rng.uniform(-12, 12)                       # face position +-12 px
    p["cy"] = 195 + rng.uniform(-12, 12)
    p["b"] = 118 * s                                           # face half-height
    p["a"] = p["b"] * rng.uniform(0.76, 0.86)                  # face half-width
    p["skin"] = jitter(rng, rng.choice(SKINS), 6)
    p["shirt"] = rng.choice(SHIRTS)
    p["collar"] = rng.choice(["v", "round"])
    # eyes: centres at (cx +- ex, ey); each sits in a "socket" of half-size hw x hh, which is
    # where a glasses lens goes. The sockets together form the eye region of eyes.csv.
    a, b = p["a"], p["b"]
    p["ey"] = p["cy"] - b * rng.uniform(0.0, 0.1)
    p["ex"] = a * rng.uniform(0.38, 0.44)
    p["hw"] = 0.84 * p["ex"]
    p["hh"] = 0.8 * p["hw"]
    p["eye"] = rng.choices(["round", "dot", "happy"], [0.6, 0.3, 0.1])[0]
    if p["eye"] == "round":
        p["erx"] = p["hw"] * rng.uniform(0.42, 0.56)
        p["ery"] = p["erx"] * rng.uniform(0.7, 0.95)
    else:
        p["erx"] = p["hw"] * rng.uniform(0.22, 0.3)
        p["ery"] = p["erx"] * rng.uniform(1.0, 1.2)
    p["iris"] = rng.choice(IRISES)
    p["gaze"] = rng.uniform(-0.25, 0.25)
    p["hair_style"] = rng.choice(["short", "long", "bob", "spiky", "bun", "curly", "bald"])
    p["hair"] = rng.choice(FUN_HAIRS) if rng.random() < 0.08 else rng.choice(HAIRS)
    p["hair_t"] = rng.uniform(6, 14) if p["hair_style"] != "curly" else rng.uniform(16, 26)
    p["fringe"] = {"short": rng.choice(["straight", "side"]), "long": rng.choice(["side", "middle", "straight"]),
                   "bob": "straight", "spiky": "straight", "bun": rng.choice(["side", "middle"]),
                   "curly": "curly", "bald": "none"}[p["hair_style"]]
    p["hair_len"] = rng.uniform(1.0, 1.5) if p["hair_style"] == "long" else rng.uniform(0.45, 0.7)
    p["side_sign"] = rng.choice([-1, 1])
    p["brows"] = rng.random() < 0.85
    p["brow_style"] = rng.choice(["line", "arc"])
    p["brow_w"] = rng.uniform(3, 7)
    p["brow_tilt"] = rng.uniform(-4, 4)
    p["brow_y"] = p["ey"] - p["hh"] * rng.uniform(0.95, 1.2)
    p["nose"] = rng.choice(["arc", "dots", "shade", "hook"])
    p["ny"] = p["cy"] + b * rng.uniform(0.18, 0.28)
    p["mouth"] = rng.choice(["smile", "grin", "flat", "o", "smirk"])
    p["my"] = p["cy"] + b * rng.uniform(0.5, 0.6)
    p["mw"] = a * rng.uniform(0.25, 0.4)
    p["blush"] = rng.random() < 0.3
    p["freckles"] = [(rng.uniform(-0.12, 0.12), rng.uniform(-0.06, 0.06)) for _ in range(6)] \
        if rng.random() < 0.15 else []
    p["moustache"] = p["hair_style"] != "bald" and rng.random() < 0.1
    p["hairline"] = min(p["cy"] - b * rng.uniform(0.42, 0.62), p["brow_y"] - 12, p["ey"] - p["hh"] - 16)
    p["spikes"] = rng.randint(5, 8)
    return p


def sample_glasses(rng, p):
    """The glasses: sampled from the image's stream only after the whole person."""
    visible = [c for c in FRAMES if math.dist(c, p["skin"]) > 80]         # frames that stand out
    return {"shape": rng.choice(["round", "rect", "wayfarer", "browline"]),
            "frame": rng.choice(visible),
            "th": rng.uniform(2.5, 6.5),                 # frame thickness (px at 400x400)
            "scale": rng.uniform(0.9, 1.0),             # lens size within the socket
            "dy": rng.uniform(-2, 2),
            "tint": (rng.choice(TINTS), rng.randint(60, 140)) if rng.random() < 0.25 else
                    ((20, 20, 25), 215) if rng.random() < 0.08 else None,
            "glare": rng.random() < 0.6,
            "bridge": rng.choice(["line", "arc"]),
            "temples": rng.random() < 0.65,
            "radius": rng.uniform(3, 9)}


def sample(seed, cls, index):
    """(person, glasses or None) for image `index` of class `cls`; a fresh stream per image."""
    rng = random.Random(f"flowdsl-avatars/{seed}/{cls}/{index}")
    person = sample_person(rng)
    return person, (sample_glasses(rng, person) if cls == "glasses" else None)


def eye_box(p, pad=1):
    """Eye region: both sockets together, as integer (x0, y0, x1, y1), x1/y1 exclusive.
    pad=1 covers the anti-aliased edge pixels of a frame drawn right up to the socket."""
    x0, x1 = p["cx"] - p["ex"] - p["hw"] - pad, p["cx"] + p["ex"] + p["hw"] + pad
    y0, y1 = p["ey"] - p["hh"] - 2 - pad, p["ey"] + p["hh"] + 2 + pad   # 2: glasses dy
    return clip_box(x0, y0, x1, y1)


def face_box(p):
    return clip_box(p["cx"] - p["a"], p["cy"] - p["b"], p["cx"] + p["a"], p["cy"] + p["b"])


def clip_box(x0, y0, x1, y1):
    return (max(0, math.floor(x0)), max(0, math.floor(y0)),
            min(SIZE, math.ceil(x1)), min(SIZE, math.ceil(y1)))


# ---------------------------------------------------------------------------------- drawing
class Pen:
    """ImageDraw in 400x400 coordinates on an SS-times larger image."""

    def __init__(self, img):
        self.img, self.d = img, ImageDraw.Draw(img)

    @staticmethod
    def _xy(pts):
        return [v * SS for v in pts]

    def ellipse(self, box, fill=None, outline=None, width=1):
        self.d.ellipse(self._xy(box), fill=fill, outline=outline, width=round(width * SS))

    def rect(self, box, fill=None, radius=0, outline=None, width=1):
        self.d.rounded_rectangle(self._xy(box), radius=radius * SS, fill=fill, outline=outline,
                                 width=round(width * SS))

    def polygon(self, pts, fill):
        self.d.polygon([(x * SS, y * SS) for x, y in pts], fill=fill)

    def line(self, pts, fill, width, joint="curve"):
        self.d.line([(x * SS, y * SS) for x, y in pts], fill=fill, width=round(width * SS), joint=joint)
        r = width * SS / 2                      # round caps
        for x, y in (pts[0], pts[-1]):
            self.d.ellipse([x * SS - r, y * SS - r, x * SS + r, y * SS + r], fill=fill)

    def arc(self, box, start, end, fill, width):
        self.d.arc(self._xy(box), start, end, fill=fill, width=round(width * SS))

    def chord(self, box, start, end, fill):
        self.d.chord(self._xy(box), start, end, fill=fill)


def new_mask():
    m = Image.new("L", (SIZE * SS, SIZE * SS), 0)
    return m, Pen(m)


def ell(cx, cy, rx, ry):
    return (cx - rx, cy - ry, cx + rx, cy + ry)


def draw_back_hair(pen, p):
    cx, cy, a, b, t, hair = p["cx"], p["cy"], p["a"], p["b"], p["hair_t"], p["hair"]
    style = p["hair_style"]
    if style == "bald":                                      # side tufts only
        for sgn in (-1, 1):
            pen.ellipse(ell(cx + sgn * a * 0.96, p["ey"] - 0.08 * b, 0.13 * a, 0.3 * b), fill=hair)
        return
    top = cy - b - t - (6 if style in ("spiky", "curly") else 2)
    pen.ellipse((cx - a - t, top, cx + a + t, cy + b * 0.35), fill=hair)
    if style in ("long", "bob"):
        pen.rect((cx - a - t, cy - b * 0.5, cx + a + t, cy + b * p["hair_len"]), fill=hair, radius=28)
    elif style == "bun":
        r = 0.36 * a
        pen.ellipse(ell(cx, top - r * 0.45, r, r), fill=hair)
    elif style == "spiky":
        n = p["spikes"]
        ecy, ery = (top + cy + b * 0.35) / 2, (cy + b * 0.35 - top) / 2
        for k in range(n):
            ang = math.pi * (1.15 + 0.7 * k / (n - 1))     # along the top of the hair outline
            x, y = cx + (a + t) * math.cos(ang), ecy + ery * math.sin(ang)
            nx, ny = math.cos(ang), math.sin(ang)            # roughly outward
            pen.polygon([(x - 15 * ny - 6 * nx, y + 15 * nx - 6 * ny), (x + 15 * ny - 6 * nx, y - 15 * nx - 6 * ny),
                         (x + 24 * nx, y + 24 * ny)], fill=hair)
    elif style == "curly":
        n = 11
        for k in range(n):
            ang = math.pi * (1.05 + 0.9 * k / (n - 1))     # upper half of the head outline
            x = cx + (a + t * 0.7) * math.cos(ang)
            y = cy - b * 0.15 + (b + t * 0.6) * math.sin(ang)
            pen.ellipse(ell(x, y, 22, 22), fill=hair)


def draw_front_hair(img, p):
    """Fringe and sideburns: the face ellipse intersected with a hair region above the eyes."""
    if p["fringe"] == "none":
        return
    cx, cy, a, b, hl = p["cx"], p["cy"], p["a"], p["b"], p["hairline"]
    region, rp = new_mask()
    w = a + 40
    if p["fringe"] == "straight":
        rp.rect((cx - w, 0, cx + w, hl), fill=255)
    elif p["fringe"] == "side":                              # swept: lower on one side
        s = p["side_sign"]
        rp.polygon([(cx - w, 0), (cx + w, 0), (cx + w, hl + s * 14), (cx - w, hl - s * 14 - 10)], fill=255)
    elif p["fringe"] == "middle":                            # curtains: parted in the middle
        top = hl - 0.35 * b
        rp.polygon([(cx - w, 0), (cx + w, 0), (cx + w, hl + 6), (cx, top), (cx - w, hl + 6)], fill=255)
    elif p["fringe"] == "curly":
        rp.rect((cx - w, 0, cx + w, hl - 12), fill=255)
        for k in range(9):
            rp.ellipse(ell(cx - a + k * a / 4, hl - 12, 15, 15), fill=255)
    # sideburns, kept above the eye sockets
    socket_top = p["ey"] - p["hh"] - 6
    for sgn in (-1, 1):
        rp.polygon([(cx + sgn * 0.7 * a, 0), (cx + sgn * 0.7 * a, hl), (cx + sgn * 0.9 * a, socket_top),
                    (cx + sgn * 2 * a, socket_top), (cx + sgn * 2 * a, 0)], fill=255)
    face, fp = new_mask()
    fp.ellipse(ell(cx, cy, a + 1, b + 1), fill=255)
    img.paste(p["hair"], (0, 0), ImageChops.multiply(face, region))


def draw_eyes(pen, p):
    skin = p["skin"]
    for sgn in (-1, 1):
        x, y, rx, ry = p["cx"] + sgn * p["ex"], p["ey"], p["erx"], p["ery"]
        if p["eye"] == "round":
            pen.ellipse(ell(x, y, rx, ry), fill=WHITE, outline=mix(skin, DARK, 0.7), width=1.5)
            ir = ry * 0.78
            ix = x + p["gaze"] * rx
            pen.ellipse(ell(ix, y, ir, ir), fill=p["iris"])
            pen.ellipse(ell(ix, y, ir * 0.5, ir * 0.5), fill=DARK)
            pen.ellipse(ell(ix + ir * 0.35, y - ir * 0.35, ir * 0.22, ir * 0.22), fill=WHITE)
        elif p["eye"] == "dot":
            pen.ellipse(ell(x, y, rx, ry), fill=DARK)
            pen.ellipse(ell(x + rx * 0.35, y - ry * 0.35, rx * 0.28, rx * 0.28), fill=WHITE)
        else:                                                # happy: closed, upward arcs
            pen.arc(ell(x, y + ry, rx * 1.6, ry * 1.4), 200, 340, fill=DARK, width=3.5)


def draw_brows(pen, p):
    if not p["brows"]:
        return
    col = mix(p["hair"], DARK, 0.35)
    for sgn in (-1, 1):
        x, y, L = p["cx"] + sgn * p["ex"], p["brow_y"], p["hw"] * 0.75
        if p["brow_style"] == "line":
            inner, outer = (x - sgn * L, y + p["brow_tilt"]), (x + sgn * L, y - p["brow_tilt"] * 0.3)
            pen.line([inner, outer], fill=col, width=p["brow_w"])
        else:
            pen.arc(ell(x, y + 8, L, 10), 200, 340, fill=col, width=p["brow_w"])


def draw_nose(pen, p):
    cx, y, dark = p["cx"], p["ny"], mix(p["skin"], DARK, 0.35)
    if p["nose"] == "arc":
        pen.arc(ell(cx, y - 6, 9, 9), 20, 160, fill=dark, width=3)
    elif p["nose"] == "dots":
        for sgn in (-1, 1):
            pen.ellipse(ell(cx + sgn * 6, y, 3, 2.5), fill=dark)
    elif p["nose"] == "shade":
        pen.ellipse(ell(cx, y - 4, 11, 8), fill=mix(p["skin"], DARK, 0.15))
    else:
        pen.line([(cx + 2, y - 30), (cx + 7, y), (cx - 4, y + 2)], fill=dark, width=3)


def draw_mouth(pen, p):
    cx, y, w = p["cx"], p["my"], p["mw"]
    lip = mix((170, 50, 60), p["skin"], 0.25)
    if p["mouth"] == "smile":
        pen.arc((cx - w, y - w * 0.6, cx + w, y + w * 0.35), 20, 160, fill=lip, width=4)
    elif p["mouth"] == "grin":
        box = (cx - w, y - w * 0.45, cx + w, y + w * 0.45)
        pen.chord(box, 0, 180, fill=(120, 30, 40))
        pen.chord((cx - w * 0.8, y - w * 0.3, cx + w * 0.8, y + w * 0.08), 0, 180, fill=WHITE)
    elif p["mouth"] == "flat":
        pen.line([(cx - w * 0.7, y), (cx + w * 0.7, y)], fill=lip, width=4)
    elif p["mouth"] == "o":
        pen.ellipse(ell(cx, y, w * 0.3, w * 0.38), fill=(120, 30, 40))
    else:                                                    # smirk
        pen.arc((cx - w, y - w * 0.5, cx + w * 0.6, y + w * 0.3), 20, 140, fill=lip, width=4)


def draw_person(p):
    n = SIZE * SS
    img = Image.new("RGB", (n, n), p["bg"])
    pen = Pen(img)
    if p["bg2"] != p["bg"]:                                  # soft vertical gradient
        for y in range(0, n, 4):
            pen.d.rectangle([0, y, n, y + 3], fill=mix(p["bg"], p["bg2"], y / n))
    cx, cy, a, b, skin = p["cx"], p["cy"], p["a"], p["b"], p["skin"]
    neck = mix(skin, DARK, 0.12)
    shoulders_y = cy + b + 14
    pen.ellipse((cx - 1.5 * a, shoulders_y, cx + 1.5 * a, shoulders_y + 2.4 * a), fill=p["shirt"])
    pen.rect((cx - 0.3 * a, cy + 0.5 * b, cx + 0.3 * a, shoulders_y + 8), fill=neck)
    if p["collar"] == "v":
        pen.polygon([(cx - 0.3 * a, shoulders_y + 4), (cx + 0.3 * a, shoulders_y + 4),
                     (cx, shoulders_y + 0.4 * a)], fill=neck)
    else:
        pen.chord((cx - 0.3 * a, shoulders_y - 0.2 * a, cx + 0.3 * a, shoulders_y + 0.25 * a), 0, 180, fill=neck)
    draw_back_hair(pen, p)
    for sgn in (-1, 1):                                      # ears
        ex, ey = cx + sgn * a * 0.97, p["ey"] + 0.06 * b
        pen.ellipse(ell(ex, ey, 0.14 * a, 0.2 * b), fill=skin)
        pen.ellipse(ell(ex + sgn * 2, ey, 0.07 * a, 0.12 * b), fill=mix(skin, DARK, 0.15))
    if p["hair_style"] == "long":                            # long hair falls in front of the ears
        for sgn in (-1, 1):
            x0 = cx + sgn * (a + p["hair_t"])
            pen.rect((min(x0, cx + sgn * a * 0.9), p["ey"] - 0.1 * b, max(x0, cx + sgn * a * 0.9),
                      cy + b * p["hair_len"]), fill=p["hair"], radius=10)
    pen.ellipse(ell(cx, cy, a, b), fill=skin)
    if p["blush"]:
        for sgn in (-1, 1):
            pen.ellipse(ell(cx + sgn * a * 0.55, p["ny"] + 4, 0.15 * a, 0.09 * b), fill=mix(skin, (240, 110, 120), 0.35))
    for dx, dy in p["freckles"]:
        for sgn in (-1, 1):
            pen.ellipse(ell(cx + sgn * a * (0.5 + dx), p["ny"] + b * dy, 1.8, 1.8), fill=mix(skin, (120, 60, 30), 0.45))
    draw_eyes(pen, p)
    draw_brows(pen, p)
    draw_nose(pen, p)
    if p["moustache"]:
        for sgn in (-1, 1):
            pen.chord((cx - (0.5 - 0.5 * sgn) * 0.3 * a - 2 * sgn, p["ny"] + 5,
                       cx + (0.5 + 0.5 * sgn) * 0.3 * a - 2 * sgn, p["ny"] + 30), 180, 360, fill=p["hair"])
    draw_mouth(pen, p)
    draw_front_hair(img, p)
    return img


def lens_shapes(p, g, sgn):
    """(kind, geometry) of one lens; everything lies inside that eye's socket."""
    x, y = p["cx"] + sgn * p["ex"], p["ey"] + g["dy"]
    lw, lh = p["hw"] * g["scale"], p["hh"] * g["scale"]
    if g["shape"] == "round":
        r = min(lw, lh * 1.12)
        return "ellipse", ell(x, y, r, lh)
    if g["shape"] in ("rect", "browline"):
        return "rect", (x - lw, y - lh * 0.85, x + lw, y + lh * 0.85)
    # wayfarer: wide straight top, raised outer corner, narrower bottom. Drawn as a line
    # centred on the outline, so inset by half the frame thickness to stay in the socket.
    lw, lh = lw - g["th"] / 2 - 1, lh - g["th"] / 2 - 1
    return "poly", [(x + sgn * lw, y - lh), (x - sgn * lw * 0.95, y - lh * 0.78),
                    (x - sgn * lw * 0.8, y + lh * 0.6), (x + sgn * lw * 0.05, y + lh * 0.88),
                    (x + sgn * lw * 0.85, y + lh * 0.45)]


def draw_glasses(img, p, g):
    th, frame = g["th"], g["frame"]
    shapes = [(sgn, *lens_shapes(p, g, sgn)) for sgn in (-1, 1)]
    if g["tint"] or g["glare"]:                              # translucent lenses and glints
        over = Image.new("RGBA", img.size, (0, 0, 0, 0))
        op = Pen(over)
        for sgn, kind, geo in shapes:
            if g["tint"]:
                col = g["tint"][0] + (g["tint"][1],)
                if kind == "ellipse":
                    op.ellipse(geo, fill=col)
                elif kind == "rect":
                    op.rect(geo, fill=col, radius=g["radius"])
                else:
                    op.polygon(geo, fill=col)
            if g["glare"]:
                x, y, lw = p["cx"] + sgn * p["ex"], p["ey"] + g["dy"], p["hw"] * g["scale"]
                op.line([(x - lw * 0.55, y - lw * 0.05), (x - lw * 0.2, y - lw * 0.4)], fill=(255, 255, 255, 150), width=3)
        img.paste(Image.alpha_composite(img.convert("RGBA"), over).convert("RGB"))
    pen = Pen(img)
    for sgn, kind, geo in shapes:
        if kind == "ellipse":
            pen.ellipse(geo, outline=frame, width=th)
        elif kind == "rect" and g["shape"] == "browline":
            x0, y0, x1, y1 = geo
            pen.rect(geo, outline=mix(frame, (190, 190, 195), 0.6), width=1.8, radius=g["radius"])
            pen.rect((x0, y0, x1, y0 + th * 1.8), fill=frame, radius=th * 0.8)
        elif kind == "rect":
            pen.rect(geo, outline=frame, width=th, radius=g["radius"])
        else:
            pen.line(geo + geo[:1], fill=frame, width=th)
    # bridge between the inner edges, near the top of the lenses
    y = p["ey"] + g["dy"] - p["hh"] * g["scale"] * 0.35
    inner = p["ex"] - p["hw"] * g["scale"] + th * 0.5
    cx = p["cx"]
    if g["bridge"] == "line":
        pen.line([(cx - inner, y), (cx + inner, y)], fill=frame, width=th * 0.9)
    else:
        pen.arc((cx - inner - 1, y - inner * 0.6, cx + inner + 1, y + inner * 1.0), 190, 350,
                fill=frame, width=max(2.0, th * 0.8))
    if g["temples"]:                                         # arms running back to the ears
        for sgn in (-1, 1):
            x0 = cx + sgn * (p["ex"] + p["hw"] * g["scale"] - th * 0.5)
            x1 = cx + sgn * p["a"] * 1.0
            y0 = p["ey"] + g["dy"] - p["hh"] * g["scale"] * 0.55
            pen.line([(x0, y0), (x1, y0 - 1)], fill=frame, width=max(2.0, th * 0.7))


def render(p, g):
    img = draw_person(p)
    if g is not None:
        draw_glasses(img, p, g)
    return img.reduce(SS)


# ------------------------------------------------------------------------------------- main
def write_all(out, count, seed):
    rows = []
    for cls in CLASSES:
        os.makedirs(os.path.join(out, cls), exist_ok=True)
        for i in range(count):
            p, g = sample(seed, cls, i)
            name = f"{cls}/{i:03d}.png"
            render(p, g).save(os.path.join(out, name), optimize=True)
            rows.append([cls, name, *eye_box(p), *face_box(p)])
    with open(os.path.join(out, "eyes.csv"), "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["class", "file", "x0", "y0", "x1", "y1", "fx0", "fy0", "fx1", "fy1"])
        w.writerows(rows)
    write_sheet(out, seed)


def write_sheet(out, seed, picks=(0, 1, 2, 3)):
    """800x400: four avatars with glasses on top, four without below."""
    sheet = Image.new("RGB", (800, 400), WHITE)
    for r, cls in enumerate(CLASSES):
        for c, i in enumerate(picks):
            sheet.paste(render(*sample(seed, cls, i)).resize((200, 200), Image.LANCZOS), (200 * c, 200 * r))
    sheet.quantize(256, dither=Image.Dither.NONE).save(os.path.join(out, "sheet.png"), optimize=True)


def check(out, count, seed):
    import numpy as np
    ok = True

    def fail(msg):
        nonlocal ok
        ok = False
        print("FAIL:", msg)

    for cls in CLASSES:                       # determinism, and agreement with files on disk
        for i in (0, count - 1):
            a = np.asarray(render(*sample(seed, cls, i)))
            b = np.asarray(render(*sample(seed, cls, i)))
            if not np.array_equal(a, b):
                fail(f"{cls}/{i:03d}: two renders with seed {seed} differ")
            path = os.path.join(out, cls, f"{i:03d}.png")
            if os.path.exists(path) and not np.array_equal(a, np.asarray(Image.open(path).convert("RGB"))):
                fail(f"{path} differs from a fresh render with seed {seed}")
    for i in range(count):                    # glasses change pixels only in the eye region
        p, g = sample(seed, "glasses", i)     # (and, for temples, sideways to the ears)
        diff = np.any(np.asarray(render(p, g)) != np.asarray(render(p, None)), axis=2)
        x0, y0, x1, y1 = eye_box(p)
        if diff[y0:y1, x0:x1].sum() < 100:
            fail(f"glasses/{i:03d}: hardly any glasses drawn in the eye region")
        outside = diff.copy()
        outside[y0:y1, x0:x1] = False
        fx0, _, fx1, _ = face_box(p)
        if g["temples"]:
            outside[y0:y1, max(0, fx0 - 3):fx1 + 3] = False
        if outside.any():
            fail(f"glasses/{i:03d}: {outside.sum()} glasses pixels outside the eye region")
    # both classes come from one distribution of people: compare a few attributes
    people = {cls: [sample(seed, cls, i)[0] for i in range(count)] for cls in CLASSES}
    for key in ("cx", "cy", "b", "ey", "ex", "erx"):
        v = {cls: np.array([q[key] for q in people[cls]]) for cls in CLASSES}
        se = np.sqrt(sum(x.var() / len(x) for x in v.values())) + 1e-9
        z = (v["glasses"].mean() - v["noglasses"].mean()) / se
        if abs(z) > 4:
            fail(f"attribute {key} differs between classes (z={z:.1f})")
    # and the people are not paired across classes
    same = sum(people["glasses"][i]["cx"] == people["noglasses"][i]["cx"] for i in range(count))
    if same:
        fail(f"{same} glasses/noglasses images with the same index are the same person")
    print("check:", "ok" if ok else "FAILED")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=HERE, help="output folder (default: this script's folder)")
    ap.add_argument("--count", type=int, default=DEFAULT_COUNT, help="images per class")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--check", action="store_true",
                    help="self-check (determinism, glasses only in the eye region) instead of writing")
    args = ap.parse_args(argv)
    if args.check:
        return 0 if check(args.out, args.count, args.seed) else 1
    write_all(args.out, args.count, args.seed)
    print(f"wrote {2 * args.count} avatars, eyes.csv and sheet.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
