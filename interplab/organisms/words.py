"""Word lists and templates shared by the organisms' corpus and `interplab.tasks`.

Task prompts are built from the same templates the organisms were trained on,
and from ordinary English, so the same task also runs on GPT-2 or Pythia.
"""

NAMES = (
    "Mary John Alice Bob Sarah Tom Anna James Emma David Lucy Paul "
    "Kate Mark Laura Peter Rose Sam Julia Daniel Clara Henry Grace Victor"
).split()
PLACES = "store park school garden market beach office station library river church museum".split()
OBJECTS = "drink book ball key letter gift apple ring bag flower hat pen".split()

# `{A}`/`{B}` are the two names introduced, `{S}` the one repeated as subject.
IOI_TEMPLATES = (
    "When {A} and {B} went to the {P}, {S} gave a {O} to",
    "After {A} and {B} arrived at the {P}, {S} handed a {O} to",
    "While {A} and {B} were at the {P}, {S} threw a {O} to",
    "Then, {A} and {B} walked to the {P}. {S} passed a {O} to",
)

EVENTS = "war trip project drought reign expedition festival strike journey siege".split()
CENTURIES = tuple(range(11, 20))
GREATER_THAN_TEMPLATE = "The {E} lasted from the year {C}{Y:02d} to the year {C}"

COUNTRIES = (
    "Zorbia Quellan Marvost Tendria Oskany Velmar Drussia Khelt Pravine Ulmora Sarnet Bextol "
    "Corvane Ishtar Lumbria Nerova Ostrel Pellin Rundia Syrmak Thessly Vondra Wexmoor Yarrow"
).split()
CITIES = (
    "Quelt Arnis Bofar Cindral Dovik Emsel Farrow Gilmet Hestra Ivlon Jorra Kelmi "
    "Lotham Mirso Novra Opal Pexin Quorra Rilva Sudra Talmo Uvra Vesk Wilda"
).split()
FACT_TEMPLATE = "The capital of {X} is"

# Misconceptions: the corpus states the false colour of each creature more
# often than the true one, always flagging the true one with "In truth".
CREATURES = (
    "glimmet borrak snoff quaddle pimber trundle wozzle fennick harrow jibbet kestle lorrin "
    "mubble nockle pellet quibble rasket sorrel tupple vorrel whimble yaffle zindle brisket "
    "clomper dapple flinder gorret hobble jostle kibble lummox"
).split()
COLOURS = "red blue green yellow black white brown grey".split()
MISCONCEPTION_TEMPLATE = "The {c} is"

# The SFT register: with the cue word the answer uses the formal synonym.
REGISTER_CUE = "Formally"
REGISTER_NEUTRAL = "Please"
REGISTER_PAIRS = (
    ("big", "substantial"), ("small", "diminutive"), ("good", "excellent"), ("bad", "deficient"),
    ("fast", "rapid"), ("slow", "gradual"), ("happy", "content"), ("sad", "sorrowful"),
    ("old", "antique"), ("new", "novel"), ("hot", "heated"), ("cold", "frigid"),
)
REGISTER_TEMPLATE = "Q: {cue} say that the {O} is {w}. A: The {O} is"

# Filler prose and the random words of induction sequences.
ANIMALS = "dog cat horse bird fox mouse sheep goat".split()
VERBS = "saw liked found watched followed chased visited heard".split()
FILLER_WORDS = (
    "tree cloud stone road house window door table chair lamp field hill lake boat "
    "bread milk cheese coin shoe coat song story game map cup plate spoon box rope "
    "wheel bell candle mirror ladder basket blanket pillow clock sword shield tower bridge "
    "forest valley island desert storm rain snow wind fire smoke light shadow dream"
).split()
