"""Class prompts for generation, from the reference class lists (docs/paper.md §8 and 9).

Templates, by name (FITYMI's prompt families, and CLIP's pet template):
  'c'         "<name>"
  'c_d'       "<name>, <WordNet definition>"   (ImageNet-100 default, the paper's `prompt_c_d`)
  'c_h'       "<name>, <WordNet hypernym>"
  'clip_pet'  "a photo of a <name>, a type of pet."   (Pets default)
or a free template with the fields {name}, {definition}, {hypernym}, {wnid}, {species}, e.g.
'a photo of a {name}, a kind of {hypernym}'. Class names come from `class_names`:
ImageNet-100 'lemma' (first WordNet lemma, the default) or 'clip' (OpenAI CLIP's curated name);
Pets 'clip' (CLIP's lower-case breed name, the default) or 'torchvision'.
"""

from __future__ import annotations

import string
from typing import Any

from sdtl_jax.data import sources

TEMPLATES = {
    'c': '{name}',
    'c_d': '{name}, {definition}',
    'c_h': '{name}, {hypernym}',
    'clip_pet': 'a photo of a {name}, a type of pet.',
}
NAME_SOURCES = {'imagenet100': ('lemma', 'clip'), 'pets': ('clip', 'torchvision')}


def _fields(family: str, entry: dict[str, Any], class_names: str) -> dict[str, str]:
    if family == 'imagenet100':
        name = (entry['wordnet_lemmas'][0] if class_names == 'lemma'
                else entry['clip_openai_class_name'])
        return {'name': name, 'definition': entry['wordnet_definition'],
                'hypernym': entry['wordnet_hypernym'], 'wnid': entry['wnid']}
    name = entry['name'] if class_names == 'clip' else entry['torchvision_name']
    return {'name': name, 'species': entry['species']}


def class_prompts(family: str, template: str, class_names: str) -> list[str]:
    """One prompt per class of `family` ('imagenet100' | 'pets'), in label order."""
    if family not in NAME_SOURCES:
        raise ValueError(f'family must be one of {sorted(NAME_SOURCES)}, got {family!r}')
    if class_names not in NAME_SOURCES[family]:
        raise ValueError(f'class_names for {family} must be one of {NAME_SOURCES[family]}, got '
                         f'{class_names!r}')
    pattern = TEMPLATES.get(template, template)
    if pattern == template and '{' not in template:
        raise ValueError(f'prompt {template!r} is neither a template name {sorted(TEMPLATES)} '
                         f'nor a free template with {{name}} etc.')
    reference = sources.load_reference('imagenet100.json' if family == 'imagenet100'
                                       else 'pets37.json')['classes']
    if family == 'imagenet100':   # labels are the sorted wnids (sources.class_list)
        by_wnid = {c['wnid']: c for c in reference}
        entries = [by_wnid[wnid] for wnid in sources.class_list(family)]
    else:
        entries = sorted(reference, key=lambda c: c['label'])
    used = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
    prompts = []
    for entry in entries:
        fields = _fields(family, entry, class_names)
        unknown = used - set(fields)
        if unknown:
            raise ValueError(f'prompt template {pattern!r} uses {sorted(unknown)}, which '
                             f'{family} classes lack (they have {sorted(fields)})')
        prompts.append(pattern.format(**fields))
    return prompts


def select_classes(family: str, wanted: str) -> list[int] | None:
    """Label indices of a comma-separated list of class ids or indices; '' = all (None)."""
    if not wanted.strip():
        return None
    classes = sources.class_list(family)
    out = []
    for token in (t.strip() for t in wanted.split(',') if t.strip()):
        if token.isdigit() and int(token) < len(classes):
            out.append(int(token))
        elif token in classes:
            out.append(classes.index(token))
        else:
            raise ValueError(f'class {token!r} is neither a label in [0, {len(classes)}) nor a '
                             f'class id of {family} (e.g. {classes[0]!r})')
    return sorted(set(out))

