"""The documentation site builds with MkDocs in strict mode (a broken link, a missing anchor or a page left out of the
navigation fails), and the site's home page is the README."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, timeout=120)


def test_the_site_builds_in_strict_mode(tmp_path):
    result = build(REPO / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    pages = {p.stem for p in (tmp_path / "site").glob("*.html")}
    assert {"index", "method", "engines", "backends", "serving", "models", "benchmarks", "verification"} <= pages
    assert (tmp_path / "site" / "diagrams" / "rounds.png").exists()


def test_a_broken_link_fails_the_build(tmp_path):
    """Strict mode must bite: the same site with one link to a page that does not exist is refused."""
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "method.md", "a") as page:
        page.write("\nSee [a page that was never written](no-such-page.md).\n")
    result = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and "no-such-page.md" in result.stderr


def test_the_home_page_is_the_readme_with_site_links():
    readme = (REPO / "README.md").read_text()
    assert (REPO / "docs" / "index.md").read_text() == readme.replace("](docs/", "]("), (
        "docs/index.md differs from README.md; regenerate it: sed 's|](docs/|](|g' README.md > docs/index.md")
    assert len(readme.splitlines()) <= 200, "the README is the front door: keep it to a screenful or two"
