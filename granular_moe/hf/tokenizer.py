"""The main job's SentencePiece model as a ``transformers`` tokenizer, converted offline.

The job's models are byte-fallback BPE without normalisation or dummy prefix
(:mod:`granular_moe.training.tokenizer`); ``transformers``' SentencePiece converter
(``SpmConverter.build_tokenizer_from_spm_proto``) follows the model's own normaliser settings, so the
``tokenizer.json`` it builds encodes text to the ids SentencePiece gives (BPE merges ranked by piece score, byte
fallback for the rest) and decodes them back. One difference: the job's tokenizer writes a literal ``▁``
(U+2581) in the text as its UTF-8 bytes, the converted one as SentencePiece itself does (a space).

The folder also gets the ``.model`` file itself as ``tokenizer.model``, which ``import-hf`` hands back to
the job.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SENTENCEPIECE_FILE = "tokenizer.model"


def job_tokenizer_model(args) -> Path:
    """The SentencePiece model the checkpoint's job trained with: ``--tokenizer-model``, or the embedded
    corpus's (built into the cache if it is not there yet)."""
    if getattr(args, "tokenizer_model", None) is not None:
        return Path(args.tokenizer_model)
    from granular_moe.training.corpus import embedded_corpus

    return Path(embedded_corpus(args.vocab_size, getattr(args, "corpus_max_bytes", None)).tokenizer_model)


def special_ids(model_path: Path) -> dict:
    """The model's special ids by ``transformers``' names (absent ones left out)."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    ids = {"bos": processor.bos_id(), "eos": processor.eos_id(), "pad": processor.pad_id(), "unk": processor.unk_id()}
    return {name: value for name, value in ids.items() if value >= 0}


def hf_tokenizer(model_path: Path):
    """A ``PreTrainedTokenizerFast`` encoding as the SentencePiece model at ``model_path`` does."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise ValueError(f"{model_path}: a {kind} SentencePiece model; the conversion handles the BPE models the "
                         "job trains")
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, merges=None, legacy=True)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    names = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "unk": "unk_token"}
    tokens = {names[name]: processor.id_to_piece(index) for name, index in special_ids(model_path).items()}
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   model_max_length=1 << 30, **tokens)


def write_tokenizer(model_path: Path, output: Path) -> None:
    """Write the converted tokenizer (``tokenizer.json``, ``tokenizer_config.json``) and the SentencePiece
    model (``tokenizer.model``) into ``output``. The config names the class ``PreTrainedTokenizerFast``, which
    ``transformers`` 4 and 5 both resolve (5 saves its new name, ``TokenizersBackend``)."""
    hf_tokenizer(model_path).save_pretrained(str(output))
    config_path = Path(output) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(model_path, Path(output) / SENTENCEPIECE_FILE)
