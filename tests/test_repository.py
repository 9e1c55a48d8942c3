"""The repository stands on its own: its docs are its own, it says how to cite and license it."""
import pathlib
import re
import subprocess

import yaml

import sdtl_jax

ROOT = pathlib.Path(__file__).parent.parent
# Notes kept beside a checkout (a parent folder's reference material, style guide) are not the
# repository's: a reader of a clone has only docs/.
OUTSIDE = re.compile(r'\.\./shared|\bSPEC\.md\b|\bSTYLE\.md\b')


def _tracked_text_files():
    names = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for name in names:
        path = ROOT / name
        if path.is_file() and path.suffix not in {'.npz', '.png', '.safetensors', '.pth'}:
            try:
                yield name, path.read_text()
            except UnicodeDecodeError:     # binary fixtures
                continue


def test_nothing_refers_to_material_outside_the_repository():
    found = [f'{name}:{i}: {line.strip()}'
             for name, text in _tracked_text_files() if name != 'tests/test_repository.py'
             for i, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, '\n'.join(found)


def test_paper_md_sections_exist_for_every_reference():
    """Code cites `docs/paper.md §N` / `section N`: each N must be a heading there."""
    headings = set(re.findall(r'^## (\d+)\. ', (ROOT / 'docs' / 'paper.md').read_text(), re.M))
    cited = set()
    for _, text in _tracked_text_files():
        for match in re.finditer(r'docs/paper\.md,?\s+(?:§|sections?\s+)(\d+)', text):
            cited.add(match.group(1))
    assert cited and cited <= headings, sorted(cited - headings)


def test_license_and_citation():
    assert 'Apache License' in (ROOT / 'LICENSE').read_text()
    citation = yaml.safe_load((ROOT / 'CITATION.cff').read_text())
    assert citation['cff-version'] == '1.2.0' and citation['license'] == 'Apache-2.0'
    assert citation['repository-code'] == sdtl_jax.REPOSITORY_URL
    paper = citation['preferred-citation']
    assert paper['title'].startswith('Investigating the Role of Fine-Tuning')
    assert [a['family-names'] for a in paper['authors']][0] == 'Hennicke'
    bibtex = [re.search(r'```bibtex\n(.*?)```', (ROOT / name).read_text(), re.S)
              for name in ('README.md', 'docs/paper.md')]
    assert bibtex[0] and bibtex[1] and bibtex[0][1] == bibtex[1][1]
    assert bibtex[0][1].startswith('@inproceedings{hennicke2024finetuning')
