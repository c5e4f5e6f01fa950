"""The course example prints the values derived in test_marginalize.test_hands_on_project."""

import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "course_example.py"


def test_course_example_prints_the_derived_values(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert 'Rank 1: doc 0 (score=0.85, p=0.3513) "Paris is the capital of France"' in out
    assert 'Rank 2: doc 4 (score=0.79, p=0.3308) "The Eiffel Tower is in Paris"' in out
    assert 'Rank 3: doc 3 (score=0.75, p=0.3179) "France is a country in Europe"' in out
    assert "RAG-Sequence probability: 0.490033" in out
    assert "RAG-Token probability:    0.485023" in out
    assert "doc 0: retriever_p=0.3513 * generator_p=0.7500 = 0.2635" in out
    assert "doc 3: retriever_p=0.3179 * generator_p=0.7500 = 0.2384" in out
    assert "marginal p'(y_0) = 0.6050" in out and "marginal p'(y_1) = 0.8017" in out
    assert "-log p(y|x) = 0.713282" in out
