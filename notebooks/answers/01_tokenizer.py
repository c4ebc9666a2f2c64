"""Answers to notebook 1's exercises (for instructors; attendees: try first).

Each `# %% name` cell replaces the notebook's exercise cell that defines `name`:
`python notebooks/workshop.py solve` writes solved copies of the notebooks, and the tests run
them. A cell imports what it uses, so it also runs on its own.
"""

# %% my_merge
def my_merge(ids, pair, new_id):
    """Replace every occurrence of pair in ids by new_id, scanning left to right."""
    merged = []
    skip_next = False                 # True right after a merge: that id is part of new_id
    for i, token in enumerate(ids):
        if skip_next:
            skip_next = False
        elif tuple(ids[i:i + 2]) == pair:
            merged.append(new_id)
            skip_next = True
        else:
            merged.append(token)
    return merged


# %% my_encode
from tokenizer import merge_pair, split_text


def my_encode(text, merges):
    """Text -> ids with learned merges {pair: new id}: inside each chunk, apply the
    earliest-learned merge present (the smallest new id), until none applies."""
    ids = []
    for chunk in split_text(text):
        chunk_ids = list(chunk.encode("utf-8"))
        while True:
            learned = [pair for pair in zip(chunk_ids, chunk_ids[1:]) if pair in merges]
            if not learned:
                break
            earliest = min(learned, key=lambda pair: merges[pair])
            chunk_ids = merge_pair(chunk_ids, earliest, merges[earliest])
        ids += chunk_ids
    return ids
