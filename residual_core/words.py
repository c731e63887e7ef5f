"""Is an identifier a common word? A small built-in list (no downloads) for a warning, not an error.

The identifier should be a rare token ("sks", "zwx", "ohwx"): training ties it to the concept, so a common
word would change every prompt that uses it, and LAG would mark wherever that word attends.
"""

from __future__ import annotations

import re

# Frequent English words and the nouns, colours and styles prompts use most.
COMMON_WORDS = frozenset("""
a about above after again against all also an and animal another any are art as at away back bad be bear
because been before being below best better between big bike bird black blue boat body book both bottle
bowl box boy brown building but by can car card cartoon castle cat chair child city clock close cloud cold
color colour come could cup cut dark day did do does dog doll done door down drawing dress each early
earth end even every eye face far fast few field film find fire first fish five flower food for forest
four from front full game garden get girl give glass go gold good great green grey gray hair hand
happy has hat have he head her here high him his home horse hot house how i if image in inside into is
it its just kid king lady lake land large last left life light like line little long look lot low make
man many may me men model more most mountain mouth much music my name near new next nice night no not
now of off old on one only open or orange other our out outside over own painting paper park part
people person photo picture pink place plant play portrait purple queen red right river road robot rock
room round run same say sea see shape she shirt shoe short side sign silver sky small snow so some
something space sports star still stone street style sun table take tall tea than that the their them
then there these they thing this those three through time to toy train tree truck two under up us use
very view wall want was watch water way we were what when where which white who why will window
wine winter with woman women wood word work world would year yellow yes you young your
""".split())


def identifier_warnings(identifier: str, class_word: str) -> list[str]:
    """One line per problem with the identifier (empty when it looks like a good rare token)."""
    words = re.findall(r"[a-z0-9]+", identifier.lower())
    lines = []
    common = [w for w in words if w in COMMON_WORDS]
    if common:
        lines.append(
            f"identifier {identifier!r}: {', '.join(repr(w) for w in common)} is a common word. The residual learns "
            "it as this concept, so other prompts that use it change too. Pick a rare token such as 'sks' or 'zwx'."
        )
    if identifier.strip().lower() == class_word.strip().lower():
        lines.append(f"identifier {identifier!r} is the class word itself: LAG can't tell the concept from the "
                     "class. Pick a rare token such as 'sks' or 'zwx'.")
    return lines
