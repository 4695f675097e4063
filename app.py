"""A Gradio web demo of a trained ConVIRT / MedCLIP model (laid out as a Hugging Face Space: see space/README.md).

    python app.py                                  # serves outputs/cpu-demo/final (after `make demo`)
    python app.py --model path/or/hub-id --port 7860

Upload a chest X-ray (PNG, JPEG, 16-bit PNG or DICOM) for zero-shot finding scores with a Grad-CAM map of the chosen
finding and the closest report sentences of a corpus (the IU X-ray reports by default), or paste a report to see the
labeler's 14 labels and the phrases behind them. The logic lives in `modeling_medclip.demo`; this file builds the
page, turns results into its tables and messages, and parses the command line.
"""

import argparse
import os
import sys
from pathlib import Path

import gradio as gr
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModel, AutoProcessor

from dataset_scripts import build_iu_xray, report_sentences
from dataset_scripts.paths import shared_data_dir
from dataset_scripts.registry import BUILDERS
from modeling_medclip.demo import (
    CUSTOM_LABELS,
    PROMPT_SETS,
    UploadError,
    XrayDemo,
    cached_text_index,
    read_upload,
    score_chart,
)

DEFAULT_MODEL = "outputs/cpu-demo/final"
DEIDENTIFIED = "XXXX"  # what de-identification left in place of names, dates and some words of the IU reports
WARNING = (
    "<div id='clinical-warning' style='background:#fdecea;border:1px solid #d93025;border-radius:6px;"
    "padding:8px 12px;color:#8c1d18'><b>Research demo, not for clinical use.</b> The scores, maps and labels below "
    "come from a research model and a rule-based labeler that have not been validated for diagnosis; do not use them "
    "to make or change any decision about a patient.</div>"
)
SCORES_NOTE = (
    "Each score compares the image with report-like sentences (prompts) about the finding. **CheXpert-5**: one of "
    "five findings, the scores sum to 1. **CheXpert-14**: every finding on its own, present against absent. The "
    "scores are not calibrated probabilities of disease. The map shows the regions that raise the similarity with the "
    "selected finding's prompts (Grad-CAM on the last feature map of the image encoder): red most, blue little, "
    "uncolored not at all. It shows what the model attends to, not where a finding is."
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("MEDCLIP_DEMO_MODEL", DEFAULT_MODEL),
                        help="saved model folder or Hub repo id (default: $MEDCLIP_DEMO_MODEL or %(default)s)")
    parser.add_argument("--reports_dir", default=None,
                        help="IU X-ray reports folder (reports.csv) whose sentences are retrieved (default: "
                             "iu-xray-reports/ of the shared data folder, when it is there); '' turns retrieval off")
    parser.add_argument("--index_backend", choices=["exact", "faiss"], default="exact")
    parser.add_argument("--cache_dir", default="outputs/app-cache", help="where the sentence index is kept")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--max_upload_mb", type=float, default=20.0)
    parser.add_argument("--prompts_per_class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="prompt sampling seed")
    return parser.parse_args(argv)


def load_model(name_or_path: str):
    """The model and processor of a saved folder or Hub repo, or `SystemExit` with what to do instead."""
    hint = "Run `make demo` to train the embedded default, or pass --model with a saved model folder or Hub repo id."
    if not Path(name_or_path).is_dir():
        try:
            validate_repo_id(name_or_path)
        except HFValidationError:
            raise SystemExit(f"No model folder at {name_or_path!r}. {hint}") from None
    try:
        return AutoModel.from_pretrained(name_or_path).eval(), AutoProcessor.from_pretrained(name_or_path)
    except OSError as error:
        raise SystemExit(f"Could not load the model {name_or_path!r}: {error}\n{hint}") from error


def corpus_sentences(reports_dir: str) -> list[str]:
    """The distinct sentences of the IU X-ray reports in `reports_dir`, in corpus order, leaving out those with a
    de-identification gap ("XXXX"), which cannot be read."""
    sentences = (example["text"] for example in report_sentences(build_iu_xray(reports_dir)))
    return list(dict.fromkeys(sentence for sentence in sentences if DEIDENTIFIED not in sentence))


def describe(model, name_or_path: str) -> str:
    config = model.config
    return (
        f"**Model:** `{name_or_path}` ({type(model).__name__}: {config.vision_config.model_type} image encoder, "
        f"{config.text_config.model_type} text encoder, {config.projection_dim}-d shared space)"
    )


def _overlay(state: dict, opacity: float):
    return gr.update(value=state["saliency"].overlay(alpha=opacity), label=f"Saliency map: {state['finding']}")


def analyse(demo: XrayDemo, max_bytes: int, upload, prompt_set: str, labels: str, opacity: float):
    """Outputs of the image panel for an upload: message, chart, score rows, finding choice, overlay, sentences,
    and the state the other events read (image, prompts, shown finding and its saliency)."""
    def cleared(message: str) -> tuple:
        return message, None, [], gr.update(choices=[], value=None), None, [], None

    if upload is None:
        return cleared("Upload a chest X-ray.")
    try:
        image = read_upload(upload, max_bytes)
    except UploadError as error:
        return cleared(f"**Cannot use this upload:** {error}")
    try:
        scores = demo.classify(image, prompt_set, labels)
    except ValueError as error:  # too few typed labels
        return cleared(f"**Cannot score these labels:** {error}")
    top = scores.top_finding
    ranked = sorted(scores.scores.items(), key=lambda item: -item[1])
    rows = [[name, round(score, 3), " | ".join(scores.prompts[name][:2])] for name, score in ranked]
    sentences = []
    if demo.sentence_index is not None:
        sentences = [[rank, round(score, 3), text] for rank, (text, score) in
                     enumerate(demo.nearest_sentences(image, k=5), start=1)]
    state = {"image": image, "prompts": scores.prompts, "finding": top,
             "saliency": demo.saliency(image, scores.prompts[top])}
    return (
        f"{Path(upload).name}: {image.width} x {image.height} pixels. Highest score: **{top}**.",
        score_chart(scores, f"Zero-shot scores ({prompt_set})"),
        rows,
        gr.update(choices=list(scores.scores), value=top),
        _overlay(state, opacity),
        sentences,
        state,
    )


def explain(demo: XrayDemo, state, finding: str, opacity: float):
    """The overlay of another finding of the last analysed image, and the new state."""
    if not state or finding not in state["prompts"]:
        return None, state
    state = {**state, "finding": finding, "saliency": demo.saliency(state["image"], state["prompts"][finding])}
    return _overlay(state, opacity), state


def fade(state, opacity: float):
    """The shown overlay at another opacity (0: the plain X-ray)."""
    return _overlay(state, opacity) if state else None


def label_report(demo: XrayDemo, text: str):
    """Labeler rows of a pasted report and a message."""
    try:
        return demo.label_report(text), ""
    except ValueError as error:
        return [], f"**Cannot label this report:** {error}"


def build_app(demo: XrayDemo, model_description: str, max_upload_mb: float) -> gr.Blocks:
    """The page: the image panel (upload, scores, saliency, sentences) above the report labeler."""
    max_bytes = int(max_upload_mb * 2**20)
    with gr.Blocks(title="MedCLIP chest X-ray demo", analytics_enabled=False) as page:
        gr.Markdown("# MedCLIP chest X-ray demo")
        gr.HTML(WARNING)
        gr.Markdown(model_description)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = gr.File(label=f"Chest X-ray: PNG, JPEG or DICOM, up to {max_upload_mb:g} MB",
                                 type="filepath", elem_id="upload")
                prompt_set = gr.Radio([*PROMPT_SETS, CUSTOM_LABELS], value="CheXpert-5", label="Findings to score")
                labels = gr.Textbox(label="Your own labels, separated by commas", visible=False,
                                    placeholder="pleural effusion, pneumothorax, no acute cardiopulmonary process")
                run = gr.Button("Analyse", variant="primary", elem_id="analyse")
                message = gr.Markdown(elem_id="upload-message")
                gr.Markdown(SCORES_NOTE)
            with gr.Column(scale=1, min_width=360):
                overlay = gr.Image(label="Saliency map", type="pil", elem_id="saliency", interactive=False,
                                   height=440)
                finding = gr.Dropdown(label="Finding shown in the map", choices=[], elem_id="finding")
                opacity = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Map opacity (0 shows the plain X-ray)",
                                    elem_id="opacity")
            chart = gr.Plot(label="Zero-shot scores", show_label=False, elem_id="chart", scale=1, min_width=360)
        with gr.Row():
            scores = gr.Dataframe(headers=["Finding", "Score", "Prompts compared (first two)"], label="Scores",
                                  interactive=False, elem_id="scores", wrap=True, max_height=1200,
                                  column_widths=["26%", "10%", "64%"], scale=3)
            sentences = gr.Dataframe(headers=["Rank", "Similarity", "Report sentence"],
                                     label="Closest report sentences (image to text retrieval)", interactive=False,
                                     elem_id="sentences", wrap=True, column_widths=["10%", "15%", "75%"], scale=2,
                                     max_height=1200,
                                     visible=demo.sentence_index is not None)
        gr.Markdown("## Report labeler")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                report = gr.Textbox(label="Paste a report (findings and impression)", lines=7, elem_id="report")
                label = gr.Button("Label report", elem_id="label-report")
                report_message = gr.Markdown(elem_id="report-message")
            report_labels = gr.Dataframe(headers=["Finding", "Label", "Phrase that decided it"], scale=2,
                                         label="CheXpert labels", interactive=False, elem_id="report-labels",
                                         max_height=1200)
        state = gr.State()

        outputs = [message, chart, scores, finding, overlay, sentences, state]
        inputs = [upload, prompt_set, labels, opacity]
        for event in (upload.upload, run.click):
            event(lambda *args: analyse(demo, max_bytes, *args), inputs, outputs)
        prompt_set.change(lambda choice: gr.update(visible=choice == CUSTOM_LABELS), prompt_set, labels)
        finding.input(lambda *args: explain(demo, *args), [state, finding, opacity], [overlay, state])
        opacity.release(fade, [state, opacity], overlay)
        label.click(lambda text: label_report(demo, text), report, [report_labels, report_message])
    return page


def sentence_index(model, processor, args: argparse.Namespace):
    """The cached index of the report corpus' sentences, or `None` when retrieval is off."""
    reports_dir = args.reports_dir
    if reports_dir is None:
        default = shared_data_dir() / BUILDERS["iu_xray"].shared_folder
        reports_dir = str(default) if default.is_dir() else ""
        if not reports_dir:
            print(f"No report corpus at {default}: sentence retrieval is off (pass --reports_dir).", flush=True)
    if not reports_dir:
        return None
    print(f"Indexing the report sentences of {reports_dir} (cached in {args.cache_dir}) ...", flush=True)
    try:
        sentences = corpus_sentences(reports_dir)
    except FileNotFoundError as error:
        raise SystemExit(f"--reports_dir: {error}") from None
    return cached_text_index(model, processor, sentences, args.cache_dir, args.index_backend)


def main(argv=None) -> None:
    args = parse_args(argv)
    model, processor = load_model(args.model)
    index = sentence_index(model, processor, args)
    demo = XrayDemo(model, processor, index, prompts_per_class=args.prompts_per_class, seed=args.seed)
    page = build_app(demo, describe(model, args.model), args.max_upload_mb)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    _, url, _ = page.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                            theme=theme, footer_links=[])
    print(f"MedCLIP demo running at {url}", flush=True)
    page.block_thread()


if __name__ == "__main__":
    sys.exit(main())
