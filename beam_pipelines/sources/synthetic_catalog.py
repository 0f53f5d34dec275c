"""Word lists, segment archetypes and the item catalog of the synthetic data set.

The generator plants user segments through category preferences; the model
can only recover them if item TEXT carries category signal, so every title
and description is assembled from per-category vocabularies (brands,
adjectives, nouns, specs). Kept apart from `synthetic.py` because it is
mostly data.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class CategoryWords:
    """Vocabulary of one top-level category."""

    brands: tuple
    adjectives: tuple
    nouns: tuple
    specs: tuple
    benefits: tuple  # completes "<Adjective> <noun> from <brand>, ..."
    audience: str  # "a good pick for <audience>" when an item spans categories
    related: tuple  # categories a second/third category is usually drawn from


def _w(text: str) -> tuple:
    """Split a ';'-separated word list (multi-word entries allowed)."""
    return tuple(part.strip() for part in text.split(";") if part.strip())


CATEGORY_WORDS: dict = {
    "outdoor": CategoryWords(
        _w("Trailblazer; Summit Peak; NorthRidge; Wildtrail; Basecamp; Alpine Co"),
        _w("Waterproof; Ultralight; Insulated; Rugged; Packable; All-Weather; Windproof; Breathable"),
        _w("Hiking Boots; Camping Tent; Trekking Poles; Sleeping Bag; Daypack; Rain Jacket; Headlamp; Water Filter; Camp Stove; Hammock"),
        _w("2-Person; 45L; 3-Season; Size 42; 800 Lumen"),
        _w("built for long days on rough trails; made to shrug off wind and rain; light enough for any backpack; tested on alpine routes"),
        "hikers and campers",
        _w("fitness; fashion; gardening"),
    ),
    "kitchen": CategoryWords(
        _w("ChefMate; Copper Lane; Hearth & Home; Kitcheneer; Saute Pro; Oak Table"),
        _w("Non-Stick; Cast Iron; Stainless Steel; Ceramic; Professional; Heavy-Duty; Enamelled; Bamboo"),
        _w("Frying Pan; Chef's Knife; Dutch Oven; Stand Mixer; Cutting Board; Saucepan Set; Blender; Spice Rack; Baking Tray; Espresso Maker"),
        _w("28cm; 5-Piece; 1.5L; 8-Inch; Set of 3"),
        _w("a weeknight workhorse for busy cooks; heats evenly from edge to centre; easy to clean after a big dinner; made for everyday cooking"),
        "home cooks",
        _w("grocery; home"),
    ),
    "books": CategoryWords(
        _w("Lantern Press; Quill & Ink; Harbor Books; Northwind Publishing; Paperleaf"),
        _w("Illustrated; Bestselling; Award-Winning; Classic; Collected; Annotated; Pocket; Definitive"),
        _w("Mystery Novel; Cookbook; History of Rome; Poetry Collection; Science Fiction Saga; Travel Guide; Biography; Fantasy Trilogy; Field Guide to Birds; Graphic Novel"),
        _w("Paperback; Hardcover; 2nd Edition; Box Set"),
        _w("a page-turner for long evenings; praised by readers and critics alike; a thoughtful gift for curious minds; beautifully typeset and bound"),
        "avid readers",
        _w("music; office; kitchen"),
    ),
    "electronics": CategoryWords(
        _w("Voltix; Nimbus; Arcwave; Pixelon; Sonari; Kyro"),
        _w("Wireless; Noise-Cancelling; Smart; 4K; Bluetooth; Portable; Fast-Charging; Compact"),
        _w("Headphones; Smartwatch; Tablet; Power Bank; Action Camera; Smart Speaker; Monitor; USB-C Hub; E-Reader; Router"),
        _w("64GB; 10000mAh; 27-Inch; Gen 2; 128GB"),
        _w("with battery life that lasts all week; pairs in seconds with your phone; packs flagship features into a small body; updated with the latest chipset"),
        "gadget lovers",
        _w("gaming; office; music"),
    ),
    "beauty": CategoryWords(
        _w("Lumiere; Velvet Rose; Pure Bloom; Aurora Skin; Maison Belle"),
        _w("Hydrating; Vegan; Fragrance-Free; Matte; Nourishing; Brightening; Long-Lasting; Organic"),
        _w("Face Serum; Lipstick; Moisturiser; Eyeshadow Palette; Shampoo; Night Cream; Mascara; Sunscreen; Body Lotion; Hair Oil"),
        _w("50ml; SPF 30; 12-Shade; Travel Size"),
        _w("gentle enough for sensitive skin; dermatologist tested and cruelty free; leaves a soft natural finish; a staple of any skincare routine"),
        "skincare fans",
        _w("fashion; home"),
    ),
    "toys": CategoryWords(
        _w("Playnest; Tiny Giants; Wonderbox; Brickly; Jolly Jumbo"),
        _w("Wooden; Educational; Remote-Control; Plush; Magnetic; Glow-in-the-Dark; Stackable; Musical"),
        _w("Building Blocks; Teddy Bear; Puzzle; Train Set; Doll House; Race Car; Science Kit; Board Game; Kite; Marble Run"),
        _w("100-Piece; Ages 3+; Ages 8+; Deluxe Edition"),
        _w("hours of screen-free fun for little hands; sparks curiosity and creativity; sturdy enough for rough play; a favourite at birthday parties"),
        "kids and families",
        _w("baby; gaming; books"),
    ),
    "fitness": CategoryWords(
        _w("IronPulse; FlexForm; Stride Athletics; CoreMotion; Peakfit"),
        _w("Adjustable; Anti-Slip; Resistance; Foldable; Cushioned; Sweat-Wicking; Heavy; Ergonomic"),
        _w("Dumbbells; Yoga Mat; Kettlebell; Jump Rope; Foam Roller; Exercise Bike; Resistance Bands; Pull-Up Bar; Running Shoes; Protein Shaker"),
        _w("20kg; 6mm; Set of 5; 12kg"),
        _w("for home workouts that actually stick; built to take daily training; helps you hit new personal bests; compact enough for small flats"),
        "gym-goers",
        _w("outdoor; fashion; grocery"),
    ),
    "gardening": CategoryWords(
        _w("GreenThumb; Bloomfield; Terra Verde; Rootwise; Hedgerow"),
        _w("Heirloom; Self-Watering; Galvanised; Organic; Perennial; Raised; Weatherproof; Compact"),
        _w("Seed Kit; Pruning Shears; Planter Box; Garden Hose; Compost Bin; Watering Can; Trowel Set; Bird Feeder; Greenhouse; Lawn Rake"),
        _w("30m; 3-Tier; 40L; Pack of 20"),
        _w("helps your beds thrive from spring to autumn; built for years in sun and rain; makes light work of weekend chores; grows a greener balcony"),
        "gardeners",
        _w("outdoor; home; pets"),
    ),
    "fashion": CategoryWords(
        _w("Urban Thread; Linen & Co; Northline; Atelier Nine; Denimworks; Velour"),
        _w("Slim-Fit; Oversized; Linen; Merino; Vintage; Tailored; Cropped; Classic"),
        _w("Denim Jacket; Sneakers; Wool Coat; Summer Dress; Leather Belt; Chino Trousers; Knit Sweater; Crossbody Bag; Sunglasses; Ankle Boots"),
        _w("Size M; Size L; Unisex; Navy"),
        _w("a wardrobe staple that goes with everything; cut from soft durable fabric; dresses up or down with ease; on trend this season"),
        "style seekers",
        _w("beauty; fitness; outdoor"),
    ),
    "pets": CategoryWords(
        _w("Happy Paws; Furbright; Tailwag; Whisker & Co; PetNest"),
        _w("Grain-Free; Orthopaedic; Chew-Proof; Reflective; Automatic; Washable; Calming; Interactive"),
        _w("Dog Bed; Cat Tree; Dog Food; Cat Litter; Leash; Pet Carrier; Chew Toy; Scratching Post; Food Bowl; Aquarium"),
        _w("10kg; Large Breed; Small Breed; 2-Pack"),
        _w("loved by dogs and cats alike; made for pets that play hard; vet approved and easy to clean; keeps your companion happy and healthy"),
        "pet owners",
        _w("gardening; grocery; home"),
    ),
    "music": CategoryWords(
        _w("Harmonix; Fretline; Soundcraft Lane; Vinyl Vale; Tempo"),
        _w("Acoustic; Electric; Vintage; Studio; Digital; Handmade; Weighted; Limited-Edition"),
        _w("Guitar; Keyboard; Vinyl Record; Ukulele; Drum Pad; Microphone; Guitar Strings; Violin; Audio Interface; Music Stand"),
        _w("61-Key; 4/4 Size; 180g; 6-String"),
        _w("with a warm rich tone; ready for the stage or the bedroom studio; a great first instrument for beginners; sounds as good as it looks"),
        "musicians",
        _w("electronics; books"),
    ),
    "office": CategoryWords(
        _w("Deskwise; Paperline; Officio; Inkwell; WorkNest"),
        _w("Ergonomic; Adjustable; Recycled; Wireless; Minimalist; Standing; Refillable; Mesh"),
        _w("Desk Chair; Notebook; Desk Lamp; Fountain Pen; Filing Cabinet; Standing Desk; Planner; Keyboard; Whiteboard; Monitor Arm"),
        _w("A5; Pack of 12; 120cm; 2025 Edition"),
        _w("keeps long workdays comfortable; brings order to a cluttered desk; built for home offices and busy teams; makes meetings more productive"),
        "remote workers",
        _w("electronics; books; home"),
    ),
    "baby": CategoryWords(
        _w("Little Sprout; Cosy Cub; Bebe Nest; Tinytot; Lullaby Lane"),
        _w("Organic Cotton; Hypoallergenic; Foldable; Soft; BPA-Free; Convertible; Lightweight; Swaddling"),
        _w("Stroller; Baby Monitor; Nappy Bag; Crib Mattress; Baby Carrier; Bottle Set; Play Mat; High Chair; Onesie Pack; Teething Ring"),
        _w("0-6 Months; 3-Pack; Newborn; 6-12 Months"),
        _w("designed with tired parents in mind; gentle on delicate skin; folds away in a single move; safety tested to the highest standards"),
        "new parents",
        _w("toys; grocery; home"),
    ),
    "grocery": CategoryWords(
        _w("Farmhouse; Golden Grain; Harvest Moon; Pantry Pure; Orchard Lane"),
        _w("Organic; Dark Roast; Gluten-Free; Extra Virgin; Wholegrain; Fair-Trade; Raw; Smoked"),
        _w("Coffee Beans; Olive Oil; Green Tea; Granola; Pasta; Honey; Dark Chocolate; Almond Butter; Basmati Rice; Maple Syrup"),
        _w("1kg; 500g; 750ml; Pack of 6; 250g"),
        _w("sourced from small independent farms; packed with flavour and nothing artificial; a pantry essential for everyday meals; roasted and packed in small batches"),
        "food lovers",
        _w("kitchen; baby; fitness"),
    ),
    "gaming": CategoryWords(
        _w("Pixelforge; Nexus Play; Overclock; Questline; Arcadia"),
        _w("Mechanical; RGB; Wireless; Pro; Tournament-Grade; Low-Latency; Collector's; Open-World"),
        _w("Gaming Mouse; Controller; Gaming Headset; Mechanical Keyboard; Gaming Chair; Adventure Game; Racing Game; Capture Card; Console Stand; Strategy Game"),
        _w("16000 DPI; Deluxe Edition; 7.1 Surround; Season Pass"),
        _w("with the precision competitive players demand; built for marathon sessions; drops you into a vast living world; lag-free on every platform"),
        "gamers",
        _w("electronics; toys; music"),
    ),
    "home": CategoryWords(
        _w("Nordic Nest; Casa Calma; Hearthstone; Linenfold; Driftwood"),
        _w("Scented; Handwoven; Velvet; Minimalist; Rustic; Blackout; Memory Foam; Ceramic"),
        _w("Candle; Throw Blanket; Cushion Set; Table Lamp; Area Rug; Curtains; Wall Clock; Vase; Duvet Cover; Bookshelf"),
        _w("King Size; 2-Pack; 160x230cm; 40cm"),
        _w("adds warmth to any living room; crafted from natural materials; makes a house feel like home; easy to style in any space"),
        "homemakers",
        _w("kitchen; gardening; office"),
    ),
}

CATEGORIES: tuple = tuple(CATEGORY_WORDS)

# How many categories an item gets: one most of the time, sometimes two or three.
_CATEGORY_COUNT_PROBS = (0.55, 0.35, 0.10)
# Share of second/third categories drawn from the primary's related list.
_RELATED_SHARE = 0.8
# Within-category popularity: weight of the r-th most popular item ~ 1/(r+1)^a.
ZIPF_EXPONENT = 1.0
# An item listed under a secondary category is found there less often.
_SECONDARY_WEIGHT = 0.5


@dataclasses.dataclass(frozen=True)
class SegmentArchetype:
    """A planted segment: favourite categories and the profile it skews toward."""

    name: str
    favourites: tuple  # category names, most preferred first
    age_mean: float
    female_share: float
    tier_bias: float  # > 0 leans toward higher membership tiers


# Taken in order: the first six are the default segments and have disjoint
# top favourites, so they separate cleanly; later ones overlap on purpose.
ARCHETYPES: tuple = (
    SegmentArchetype("outdoor adventurers", ("outdoor", "fitness", "fashion"), 34, 0.42, 0.0),
    SegmentArchetype("home cooks", ("kitchen", "grocery", "home"), 46, 0.62, 0.3),
    SegmentArchetype("tech enthusiasts", ("electronics", "gaming", "office"), 30, 0.30, 0.4),
    SegmentArchetype("young parents", ("baby", "toys", "grocery"), 32, 0.66, -0.1),
    SegmentArchetype("bookworms", ("books", "music", "office"), 51, 0.58, -0.2),
    SegmentArchetype("beauty and fashion fans", ("beauty", "fashion", "home"), 28, 0.76, 0.2),
    SegmentArchetype("pet owners", ("pets", "gardening", "grocery"), 42, 0.56, 0.0),
    SegmentArchetype("gamers", ("gaming", "electronics", "music"), 23, 0.28, -0.3),
    SegmentArchetype("fitness fanatics", ("fitness", "grocery", "fashion"), 29, 0.50, 0.2),
    SegmentArchetype("garden lovers", ("gardening", "home", "outdoor"), 57, 0.55, 0.1),
    SegmentArchetype("music makers", ("music", "electronics", "books"), 27, 0.40, -0.1),
    SegmentArchetype("remote workers", ("office", "home", "electronics"), 37, 0.50, 0.3),
)


def segment_archetypes(num_segments: int, rng: np.random.Generator) -> list:
    """The first `num_segments` archetypes, extended with random mixes if asked for more."""
    chosen = list(ARCHETYPES[:num_segments])
    for extra in range(num_segments - len(chosen)):
        favs = tuple(str(c) for c in rng.choice(CATEGORIES, size=3, replace=False))
        chosen.append(
            SegmentArchetype(
                f"eclectic shoppers {extra + 1} ({', '.join(favs)})",
                favs,
                float(rng.uniform(25, 55)),
                float(rng.uniform(0.35, 0.65)),
                float(rng.uniform(-0.3, 0.3)),
            )
        )
    return chosen


@dataclasses.dataclass(frozen=True)
class Catalog:
    """The generated items; arrays are `[num_items]` unless noted."""

    titles: list
    descriptions: list
    categories: list  # list of tuples of category names, primary first
    membership: np.ndarray  # [num_items, num_categories] float64 weight of item in category
    quality: np.ndarray  # per-item rating offset


def _initials(words: str) -> str:
    letters = "".join(w[0] for w in words.replace("-", " ").split() if w[0].isalpha())
    return (letters.upper() + "XX")[:2]


def build_catalog(num_items: int, rng: np.random.Generator) -> Catalog:
    """Draw `num_items` items with readable, unique titles.

    A Python loop over items is fine here (catalogs stay in the tens of
    thousands); everything per-interaction is vectorised elsewhere.
    """
    num_cats = len(CATEGORIES)
    cat_index = {c: i for i, c in enumerate(CATEGORIES)}
    # Category sizes differ, like real shops; every category gets an item
    # first (when there are enough items) so no planted favourite is empty.
    cat_probs = rng.dirichlet(np.full(num_cats, 8.0))
    primary = rng.choice(num_cats, size=num_items, p=cat_probs)
    head = min(num_items, num_cats)
    primary[:head] = rng.permutation(num_cats)[:head]
    n_cats = rng.choice(3, size=num_items, p=_CATEGORY_COUNT_PROBS) + 1
    picks = rng.random((num_items, 8))  # template, brand, adjective, noun, spec, benefit, 2 related
    related_draw = rng.random((num_items, 2))
    other_draw = rng.integers(0, num_cats, size=(num_items, 2))
    quality = rng.normal(0.0, 0.35, size=num_items)

    titles, descriptions, categories = [], [], []
    seen: dict = {}
    membership = np.zeros((num_items, num_cats))
    for i in range(num_items):
        name = CATEGORIES[primary[i]]
        words = CATEGORY_WORDS[name]
        p = picks[i]
        brand = words.brands[int(p[1] * len(words.brands))]
        adj = words.adjectives[int(p[2] * len(words.adjectives))]
        noun = words.nouns[int(p[3] * len(words.nouns))]
        spec = words.specs[int(p[4] * len(words.specs))]
        template = int(p[0] * 4)
        if template == 0:
            base = f"{brand} {adj} {noun}"
        elif template == 1:
            base = f"{adj} {noun} {spec}"
        elif template == 2:
            base = f"{brand} {noun} {spec}"
        else:
            base = f"{brand} {adj} {noun} {spec}"
        count = seen.get(base, 0)
        seen[base] = count + 1
        # Repeats get a model code; codes are unique per base title.
        title = base if count == 0 else f"{base}, Model {_initials(brand)}-{count + 1}00"

        cats = [name]
        for j in range(n_cats[i] - 1):
            if related_draw[i, j] < _RELATED_SHARE:
                cand = words.related[int(p[6 + j] * len(words.related))]
            else:
                cand = CATEGORIES[other_draw[i, j]]
            if cand not in cats:
                cats.append(cand)
        membership[i, cat_index[name]] = 1.0
        for extra in cats[1:]:
            membership[i, cat_index[extra]] = _SECONDARY_WEIGHT

        benefit = words.benefits[int(p[5] * len(words.benefits))]
        sentence = f"{adj} {noun.lower()} from {brand}, {benefit}"
        if len(cats) > 1:
            audiences = " and ".join(CATEGORY_WORDS[c].audience for c in cats[1:])
            sentence += f" - a good pick for {audiences}"
        titles.append(title)
        descriptions.append(sentence + ".")
        categories.append(tuple(cats))
    return Catalog(titles, descriptions, categories, membership, quality)


def category_samplers(catalog: Catalog, rng: np.random.Generator) -> tuple:
    """Flattened per-category Zipf samplers for vectorised item draws.

    Returns `(keys, items, nonempty)`: `keys` is `[total]` with category c's
    cumulative weights shifted by c (so one `searchsorted(keys, c + u)` draws
    from category c for a whole batch), `items` the item index at each key,
    `nonempty` `[num_categories]` bool.
    """
    num_items, num_cats = catalog.membership.shape
    # One latent popularity per item, so an item is popular in all its categories.
    popularity = rng.permutation(num_items)
    keys, items = [], []
    nonempty = np.zeros(num_cats, dtype=bool)
    for c in range(num_cats):
        members = np.flatnonzero(catalog.membership[:, c] > 0)
        if members.size == 0:
            continue
        nonempty[c] = True
        members = members[np.argsort(popularity[members], kind="stable")]
        w = catalog.membership[members, c] / np.power(np.arange(1, members.size + 1), ZIPF_EXPONENT)
        cdf = np.cumsum(w) / w.sum()
        cdf[-1] = 1.0
        keys.append(c + cdf)
        items.append(members)
    return np.concatenate(keys), np.concatenate(items), nonempty
