"""The Gradio demo `app.py`: its command line, and the page driven by a real headless Chromium through selenium.

The browser test starts `python app.py` on a free local port with a tiny saved model, uploads a real X-ray from
`../shared/data/`, and saves a screenshot of the page to `tests/artifacts/app.png` (git-ignored).
"""

import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from transformers import AutoTokenizer

from modeling_medclip import MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor
from modeling_medclip.demo import XrayDemo, read_upload
from modeling_medclip.labeler import CHEXPERT_CLASSES

gr = pytest.importorskip("gradio", reason="the web demo needs gradio: pip install medclip-hf[demo]")
import app  # noqa: E402  (after the gradio check)

ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
REPORT = "Mild cardiomegaly. No pleural effusion or pneumothorax. Possible left basilar atelectasis."
CHEXPERT5 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,2300",
]
WAIT_S = 90  # generous: the test machine may be shared and slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    """A tiny MedCLIP with the Bio_ClinicalBERT tokenizer, saved as a model folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-medclip")
    image_processor = MedCLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    MedCLIPModel(tiny_config()).save_pretrained(folder)
    MedCLIPProcessor(image_processor, AutoTokenizer.from_pretrained(tokenizer_dir)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reports_dir(tmp_path_factory, iu_reports_dir):
    """The first 40 real IU reports, in the corpus' own layout."""
    folder = tmp_path_factory.mktemp("iu-xray-reports")
    pd.read_csv(iu_reports_dir / "reports.csv", keep_default_na=False).head(40).to_csv(folder / "reports.csv", index=False)
    return folder


# ------------------------------------------------------------------------------------------- command line


def test_missing_default_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDCLIP_DEMO_MODEL", raising=False)
    with pytest.raises(SystemExit, match=r"No model folder at 'outputs/cpu-demo/final'\. Run `make demo`"):
        app.load_model(app.parse_args([]).model)
    with pytest.raises(SystemExit, match="pass --model"):
        app.load_model(str(tmp_path / "nowhere" / "model"))


def test_model_folder_loads(model_dir):
    model, processor = app.load_model(str(model_dir))
    assert isinstance(model, MedCLIPModel) and not model.training
    assert isinstance(processor, MedCLIPProcessor)
    assert "MedCLIPModel: resnet image encoder, bert text encoder" in app.describe(model, str(model_dir))


def test_corpus_sentences_are_distinct_and_readable(reports_dir):
    sentences = app.corpus_sentences(str(reports_dir))
    assert sentences and len(sentences) == len(set(sentences))
    assert not any(app.DEIDENTIFIED in sentence for sentence in sentences)
    text = " ".join(pd.read_csv(reports_dir / "reports.csv", keep_default_na=False)["text"])
    assert all(sentence in text for sentence in sentences)


def test_retrieval_corpus_flag(model_dir, tmp_path):
    model, processor = app.load_model(str(model_dir))
    assert app.sentence_index(model, processor, app.parse_args(["--reports_dir", ""])) is None
    missing = app.parse_args(["--reports_dir", str(tmp_path / "missing"), "--cache_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--reports_dir: IU X-ray reports folder not found"):
        app.sentence_index(model, processor, missing)


def test_handlers_of_the_page(model_dir, covid_cxr_dir, tmp_path):
    model, processor = app.load_model(str(model_dir))
    demo = XrayDemo(model, processor)
    xray = str(covid_cxr_dir / "images" / "000001-12.jpg")
    message, _, rows, _, overlay, sentences, state = app.analyse(demo, 2**20, xray, "CheXpert-5", "", 0.45)
    assert "Highest score" in message and sentences == []
    assert [row[1] for row in rows] == sorted((row[1] for row in rows), reverse=True)
    assert state["finding"] == rows[0][0] and overlay["label"] == f"Saliency map: {rows[0][0]}"

    other = rows[-1][0]
    overlay, shown = app.explain(demo, state, other, 0.45)
    assert shown["finding"] == other and overlay["label"] == f"Saliency map: {other}"
    assert not (shown["saliency"].heatmap == state["saliency"].heatmap).all()
    plain = app.fade(shown, 0.0)["value"]
    assert (plain.convert("L").tobytes() == shown["saliency"].image.tobytes())

    bad = tmp_path / "notes.txt"
    bad.write_text("no image")
    message, chart, rows, _, overlay, _, state = app.analyse(demo, 2**20, str(bad), "CheXpert-5", "", 0.45)
    assert message.startswith("**Cannot use this upload:** notes.txt") and (chart, rows, overlay, state) == (
        None, [], None, None
    )
    message, *_ = app.analyse(demo, 2**20, xray, app.CUSTOM_LABELS, "effusion", 0.45)
    assert message.startswith("**Cannot score these labels:** Type at least two labels")
    assert app.label_report(demo, " ") == ([], "**Cannot label this report:** report text is empty: there is nothing to label")


# ------------------------------------------------------------------------------------------------ browser


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_app(arguments: list[str]) -> tuple[subprocess.Popen, str]:
    """Runs `python app.py ...` and returns the process and the address it prints."""
    process = subprocess.Popen(
        [sys.executable, "app.py", *arguments], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    output, deadline = [], time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        output.append(line)
        if "running at http://" in line:
            return process, line.split("running at ")[1].strip()
    process.kill()
    raise AssertionError("app.py did not print its address:\n" + "".join(output))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
    binary = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("the browser test needs Chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def _table(driver, element_id: str) -> list[list[str]]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f"#{element_id} [role=row]")
    return [[cell.text for cell in row.find_elements(By.CSS_SELECTOR, "[role=gridcell]")] for row in rows[1:]]


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(lambda d: condition(d), message=what)


def _upload(driver, path) -> None:
    from selenium.webdriver.common.by import By

    clear = driver.find_elements(By.CSS_SELECTOR, "#upload button[aria-label=Clear]")
    if clear:
        clear[0].click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "the upload field")
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))


def _message(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "upload-message").text


@pytest.mark.slow
def test_app_in_a_real_browser(browser, model_dir, reports_dir, covid_cxr_dir, tmp_path):
    from selenium.webdriver.common.by import By

    xray = covid_cxr_dir / "images" / "000001-12.jpg"
    model, processor = app.load_model(str(model_dir))
    expected = XrayDemo(model, processor)
    image = read_upload(xray, max_bytes=2**20)
    process, url = _start_app([
        "--model", str(model_dir), "--reports_dir", str(reports_dir), "--cache_dir", str(tmp_path / "cache"),
        "--port", str(_free_port()),
    ])
    try:
        assert url.startswith("http://127.0.0.1:")
        browser.get(url)
        _wait(browser, lambda d: "not for clinical use" in d.find_element(By.TAG_NAME, "body").text, "the warning")

        # A real X-ray: a score for each CheXpert-5 finding, equal to the library's, and the saliency overlay.
        _upload(browser, xray)
        _wait(browser, lambda d: "Highest score" in _message(d), "the scores of the upload")
        _wait(browser, lambda d: len(_table(d, "scores")) == 5, "five score rows")
        scores = expected.classify(image, "CheXpert-5").scores
        assert {row[0]: float(row[1]) for row in _table(browser, "scores")} == pytest.approx(scores, abs=1e-3)
        overlay = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#saliency img"), "the overlay")[0]
        _wait(browser, lambda d: overlay.get_property("naturalWidth") == image.width, "the overlay at full size")
        _wait(browser, lambda d: any(chart.get_property("naturalWidth") > 0 and chart.is_displayed()
                                     for chart in d.find_elements(By.CSS_SELECTOR, "#chart img")), "the bar chart")
        assert len(_table(browser, "sentences")) == 5

        # CheXpert-14: every finding scored.
        browser.find_element(By.CSS_SELECTOR, "input[type=radio][value='CheXpert-14']").click()
        browser.find_element(By.ID, "analyse").click()
        _wait(browser, lambda d: len(_table(d, "scores")) == 14, "fourteen score rows")
        scores = expected.classify(image, "CheXpert-14").scores
        assert {row[0]: float(row[1]) for row in _table(browser, "scores")} == pytest.approx(scores, abs=1e-3)

        # A pasted report: the labeler's 14 labels with their phrases.
        browser.find_element(By.CSS_SELECTOR, "#report textarea").send_keys(REPORT)
        browser.find_element(By.ID, "label-report").click()
        _wait(browser, lambda d: len(_table(d, "report-labels")) == 14, "the report's labels")
        rows = _table(browser, "report-labels")
        assert rows == [list(row) for row in expected.label_report(REPORT)]
        assert [row[0] for row in rows] == list(CHEXPERT_CLASSES)
        assert rows[CHEXPERT_CLASSES.index("Cardiomegaly")] == ["Cardiomegaly", "positive", "cardiomegaly"]

        ARTIFACTS.mkdir(exist_ok=True)
        browser.set_window_size(1400, browser.execute_script("return document.documentElement.scrollHeight") + 200)
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(ARTIFACTS / "app.png"))
        print(f"screenshot of the app: {ARTIFACTS / 'app.png'}")

        # Bad uploads: a message naming the file, in place of the results.
        corrupt = tmp_path / "broken.dcm"
        corrupt.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
        not_an_image = tmp_path / "notes.txt"
        not_an_image.write_text("Mild cardiomegaly.")
        for path in (corrupt, not_an_image):
            _upload(browser, path)
            _wait(browser, lambda d: f"{path.name} is not a readable" in _message(d), f"the message about {path.name}")
            assert "Cannot use this upload" in _message(browser)
            assert _table(browser, "scores") == []
    finally:
        process.terminate()
        process.wait(timeout=30)
