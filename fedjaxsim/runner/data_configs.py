"""One frozen config dataclass per dataset family, each loading its dataset.

A family holds exactly the keys that apply to its datasets (a key of another
family is an error, not silently ignored). Adding a family to the runner
means one dataclass here and one entry in :data:`DATA_CONFIGS`; the command
line (``data:FAMILY``, or ``--dataset NAME``) and YAML
(``data: {name: NAME, ...}``) follow.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, ClassVar, Literal

import tyro

from fedjaxsim.core.validation import InvalidArgument, check_int, check_real
from fedjaxsim.data.federated import FederatedDataset

NumClients = Annotated[
    int, tyro.conf.arg(aliases=("--num-clients",), help="Clients of the partitioned train split.")
]
DirichletAlpha = Annotated[
    float,
    tyro.conf.arg(
        aliases=("--dirichlet-alpha",), help="Dirichlet concentration of the label skew."
    ),
]
Partition = Literal["iid", "dirichlet", "shards", "quantity"]


def _switch(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise ValueError(f"expected true or false, got {text!r}")
    return lowered == "true"


# A bool that takes a value on the command line (`--data.download false`), in any case.
Switch = tyro.conf.FlagConversionOff[
    Annotated[
        bool,
        tyro.constructors.PrimitiveConstructorSpec(
            nargs=1,
            metavar="{true,false}",
            instance_from_str=lambda args: _switch(args[0]),
            is_instance=lambda value: isinstance(value, bool),
            str_from_instance=lambda value: [str(value).lower()],
        ),
    ]
]


DEFAULT_EOS_TOKEN = "<|endoftext|>"  # fedjaxsim.data.text's; not imported, to keep this light


def _check_file(name: str, path: str | None, what: str) -> None:
    """A local file the dataset reads must exist before any work starts."""
    from pathlib import Path

    if path is None:
        return
    if not isinstance(path, str) or not path:
        raise InvalidArgument(name, f"{name} must be a non-empty path, got {path!r}")
    if not Path(path).expanduser().exists():
        raise InvalidArgument(name, f"{name}={path!r} does not exist: {what}")


def _check_tokenizer(name: str, path: str | None) -> None:
    _check_file(
        name,
        path,
        "a local Hugging Face tokenizer.json (or a folder holding one) is expected; nothing "
        "is downloaded",
    )
    if path is not None:
        from pathlib import Path

        folder = Path(path).expanduser()
        if folder.is_dir() and not (folder / "tokenizer.json").is_file():
            raise InvalidArgument(name, f"{name}={path!r} is a folder without a tokenizer.json")


def data_config(cls):
    """A frozen, keyword-only dataclass."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


@data_config
class DigitsData:
    """scikit-learn's 1,797 handwritten 8x8 digits (embedded), Dirichlet label skew."""

    name: tyro.conf.Suppress[Literal["digits"]] = "digits"
    num_clients: NumClients = 100
    alpha: DirichletAlpha = 0.5
    test_fraction: float = 0.2
    """Stratified share of the examples held out for test."""

    partition: ClassVar = "dirichlet"  # how the test split is cut for per-client evaluation
    shards_per_client: ClassVar = 2
    pixel_levels: ClassVar = 16  # scikit-learn's digits have gray levels 0..16

    def check(self) -> None:
        check_int("num_clients", self.num_clients, minimum=1)
        check_real("alpha", self.alpha, minimum=0.0, strict_minimum=True)
        check_real(
            "test_fraction",
            self.test_fraction,
            minimum=0.0,
            maximum=1.0,
            strict_minimum=True,
            strict_maximum=True,
        )

    def population(self) -> int:
        return self.num_clients

    def load(self, seed: int, progress: bool) -> FederatedDataset:
        del progress
        from fedjaxsim.data.digits import federated_digits

        return federated_digits(self.num_clients, self.alpha, self.test_fraction, seed)


@data_config
class FederatedEmnistData:
    """Federated EMNIST, its writers as clients (3,400; 3,383 for the digits-only variant)."""

    name: Literal["federated_emnist", "federated_emnist_digits"] = "federated_emnist"
    """federated_emnist: 62 classes; federated_emnist_digits: the 10-class variant."""
    pixel_levels: ClassVar = 255  # 8-bit images
    source: Literal["tff", "fedjax"] = "tff"
    """Published files to read (identical data)."""
    data_dir: str | None = None
    """Dataset cache folder (default $FEDJAXSIM_DATA_DIR or the user cache)."""
    download: Switch = True
    """Whether missing files may be downloaded."""

    def check(self) -> None:
        pass

    def population(self) -> int:
        from fedjaxsim.data.emnist import PUBLISHED_FACTS

        only_digits = self.name == "federated_emnist_digits"
        return PUBLISHED_FACTS[(only_digits, "train")].num_clients

    def load(self, seed: int, progress: bool) -> FederatedDataset:
        del seed
        from fedjaxsim.data.emnist import load_federated_emnist

        return load_federated_emnist(
            self.name == "federated_emnist_digits",
            source=self.source,
            data_dir=self.data_dir,
            download=self.download,
            progress=progress,
        )


@data_config
class TfdsData:
    """A TFDS image dataset, its train split partitioned into clients."""

    name: Literal["mnist", "emnist/byclass", "fashion_mnist", "cifar10", "cifar100"] = "mnist"
    pixel_levels: ClassVar = 255  # 8-bit images
    num_clients: NumClients = 100
    partition: Partition = "dirichlet"
    """Partitioner of the train split."""
    alpha: DirichletAlpha = 0.5
    shards_per_client: int = 2
    """Shards per client for partition=shards."""
    data_dir: str | None = None
    """Dataset cache folder (default $FEDJAXSIM_DATA_DIR or the user cache)."""
    download: Switch = False
    """Whether TFDS may download and prepare a missing dataset."""

    def check(self) -> None:
        check_int("num_clients", self.num_clients, minimum=1)
        check_real("alpha", self.alpha, minimum=0.0, strict_minimum=True)
        check_int("shards_per_client", self.shards_per_client, minimum=1)

    def population(self) -> int:
        return self.num_clients

    def load(self, seed: int, progress: bool) -> FederatedDataset:
        del progress
        from fedjaxsim.data.tfds_images import federated_tfds

        return federated_tfds(
            self.name,
            num_clients=self.num_clients,
            partition=self.partition,
            seed=seed,
            alpha=self.alpha,
            shards_per_client=self.shards_per_client,
            data_dir=self.data_dir,
            download=self.download,
        )


@data_config
class ShakespeareData:
    """Shakespeare (LEAF, as TFF and FedJAX publish it): each speaking role of each play
    is a client (715); next-character prediction over sequences of 80."""

    name: tyro.conf.Suppress[Literal["shakespeare"]] = "shakespeare"
    pixel_levels: ClassVar = 255  # not images; recorded in checkpoints for predict
    source: Literal["tff", "fedjax", "leaf"] = "tff"
    """Published files to read (identical clients)."""
    sequence_length: int = 80
    """Characters per training sequence (FedJAX and TFF use 80)."""
    data_dir: str | None = None
    """Dataset cache folder (default $FEDJAXSIM_DATA_DIR or the user cache)."""
    download: Switch = True
    """Whether missing files may be downloaded."""
    strict: bool = True
    """Refuse files whose client and example counts differ from the published ones."""
    tokenizer: str | None = None
    """None: FedJAX's 90 character ids. A path: each role re-tokenized with that local
    Hugging Face tokenizer.json (for fine-tuning a pretrained language model)."""
    eos_token: str = DEFAULT_EOS_TOKEN
    """End-of-text token of the tokenizer, ending each snippet."""

    def check(self) -> None:
        check_int("sequence_length", self.sequence_length, minimum=1)
        _check_tokenizer("tokenizer", self.tokenizer)

    def population(self) -> int:
        from fedjaxsim.data.shakespeare import PUBLISHED_FACTS

        return PUBLISHED_FACTS["train"].num_clients

    def load(self, seed: int, progress: bool) -> FederatedDataset:
        del seed
        from fedjaxsim.data.shakespeare import load_shakespeare

        return load_shakespeare(
            source=self.source,
            data_dir=self.data_dir,
            download=self.download,
            progress=progress,
            strict=self.strict,
            sequence_length=self.sequence_length,
            tokenizer=self.tokenizer,
            eos_token=self.eos_token,
        )


@data_config
class FedCifar100Data:
    """CIFAR-100 split over 500 train and 100 test clients by a Pachinko
    allocation (Reddi et al. 2021, as TFF and FedJAX publish it)."""

    name: tyro.conf.Suppress[Literal["fed_cifar100"]] = "fed_cifar100"
    pixel_levels: ClassVar = 255  # 8-bit images
    source: Literal["tff", "fedjax"] = "tff"
    """Published files to read (identical clients)."""
    data_dir: str | None = None
    """Dataset cache folder (default $FEDJAXSIM_DATA_DIR or the user cache)."""
    download: Switch = True
    """Whether missing files may be downloaded."""
    strict: bool = True
    """Refuse files whose client and example counts differ from the published ones."""

    def check(self) -> None:
        pass

    def population(self) -> int:
        from fedjaxsim.data.fed_cifar100 import PUBLISHED_FACTS

        return PUBLISHED_FACTS["train"].num_clients

    def load(self, seed: int, progress: bool) -> FederatedDataset:
        del seed
        from fedjaxsim.data.fed_cifar100 import load_fed_cifar100

        return load_fed_cifar100(
            source=self.source,
            data_dir=self.data_dir,
            download=self.download,
            progress=progress,
            strict=self.strict,
        )


@data_config
class StackOverflowData:
    """Stack Overflow (TFF): each user is a client (342,477 in train); next-word
    prediction (stackoverflow_nwp) or tag prediction (stackoverflow_tp)."""

    name: Literal["stackoverflow_nwp", "stackoverflow_tp"] = "stackoverflow_nwp"
    """stackoverflow_nwp: next word over 10,000 words; stackoverflow_tp: top-500 tags
    from a bag of the top 10,000 words."""
    pixel_levels: ClassVar = 255  # not images; recorded in checkpoints for predict
    eval_split: Literal["test", "held_out"] = "test"
    """Split evaluated on."""
    test_examples: int | None = 10_000
    """Evaluate on this many examples sampled from the eval split (Reddi et al.
    use 10,000); None evaluates the whole split."""
    data_dir: str | None = None
    """Dataset cache folder (default $FEDJAXSIM_DATA_DIR or the user cache)."""
    download: Switch = True
    """Whether missing files may be downloaded."""
    strict: bool = True
    """Refuse files whose client and example counts differ from the published ones."""
    sequence_length: int = 20
    """stackoverflow_nwp: words per sentence row (TFF and Reddi et al. use 20), or tokens
    per row with a tokenizer."""
    tokenizer: str | None = None
    """stackoverflow_nwp only. None: TFF's 10,000 word ids. A path: each sentence
    tokenized with that local Hugging Face tokenizer.json (for fine-tuning a pretrained
    language model; the runner fills in the model's own)."""
    eos_token: str = DEFAULT_EOS_TOKEN
    """End-of-text token of the tokenizer, before and after each sentence."""

    def check(self) -> None:
        if self.test_examples is not None:
            check_int("test_examples", self.test_examples, minimum=1)
        check_int("sequence_length", self.sequence_length, minimum=1)
        if self.name == "stackoverflow_nwp":
            _check_tokenizer("tokenizer", self.tokenizer)
            return
        if self.tokenizer is not None:
            raise InvalidArgument(
                "tokenizer",
                f"a tokenizer (tokenizer={self.tokenizer!r}, or a pretrained model's) applies "
                f"to next-word prediction (stackoverflow_nwp) only; {self.name} keeps its bag "
                "of words. Use --dataset stackoverflow_nwp to fine-tune a language model",
            )
        if self.sequence_length != 20:
            raise InvalidArgument(
                "sequence_length",
                f"sequence_length applies to stackoverflow_nwp only; {self.name} has none",
            )

    def population(self) -> int:
        from fedjaxsim.data.stackoverflow import PUBLISHED_FACTS

        return PUBLISHED_FACTS["train"].num_clients

    def load(self, seed: int, progress: bool) -> FederatedDataset:
        from fedjaxsim.data.stackoverflow import load_stackoverflow

        return load_stackoverflow(
            self.name,
            eval_split=self.eval_split,
            test_examples=self.test_examples,
            seed=seed,
            data_dir=self.data_dir,
            download=self.download,
            progress=progress,
            strict=self.strict,
            **(
                {
                    "sequence_length": self.sequence_length,
                    "tokenizer": self.tokenizer,
                    "eos_token": self.eos_token,
                }
                if self.name == "stackoverflow_nwp"
                else {}
            ),
        )


@data_config
class InstructionData:
    """Instruction tuning from a JSONL file (one JSON object per line, Alpaca's fields by
    default), tokenized with a local tokenizer.json; clients by a user field, or by
    Dirichlet label skew over a category field."""

    name: tyro.conf.Suppress[Literal["instructions"]] = "instructions"
    pixel_levels: ClassVar = 255  # not images; recorded in checkpoints for predict
    # Per-client evaluation re-splits a one-client test split IID.
    partition: ClassVar = "iid"
    shards_per_client: ClassVar = 2
    path: str
    """The train JSONL file."""
    tokenizer: str
    """A local Hugging Face tokenizer.json, or a folder holding one."""
    test_path: str | None = None
    """A held-out JSONL file, split like the train file (default: test_fraction)."""
    test_fraction: float | None = None
    """Without test_path: the seeded share of each client's records held out (default 0.1)."""
    sequence_length: int = 512
    """Tokens per example; longer examples are truncated (and counted)."""
    user_field: str | None = None
    """Split by this field: each distinct value is a client."""
    category_field: str | None = None
    """Split by Dirichlet(alpha) label skew over this field into num_clients clients."""
    num_clients: Annotated[
        int | None,
        tyro.conf.arg(aliases=("--num-clients",), help="Clients of the category_field split."),
    ] = None
    alpha: DirichletAlpha = 0.5
    instruction_field: str = "instruction"
    """JSON key of the instruction."""
    input_field: str = "input"
    """JSON key of the optional input (missing, null or empty: the no-input template)."""
    response_field: str = "output"
    """JSON key of the response."""
    prompt_template: str | None = None
    """str.format template of a record with an input, with {instruction} and {input}
    (None: Stanford Alpaca's)."""
    prompt_template_no_input: str | None = None
    """Template of a record without an input, with {instruction} (None: Alpaca's)."""
    train_on_prompt: Switch = False
    """Also train on the prompt's tokens (default: the loss is on the response only)."""
    eos_token: str = DEFAULT_EOS_TOKEN
    """End-of-text token of the tokenizer, ending each response."""

    def check(self) -> None:
        check_int("sequence_length", self.sequence_length, minimum=1)
        if (self.user_field is None) == (self.category_field is None):
            raise InvalidArgument(
                "user_field",
                "give exactly one of user_field (each distinct value a client) and "
                "category_field (a Dirichlet split over it into num_clients clients)",
            )
        if self.category_field is not None:
            if self.num_clients is None:
                raise InvalidArgument(
                    "num_clients", f"category_field={self.category_field!r} needs num_clients"
                )
            check_int("num_clients", self.num_clients, minimum=1)
            check_real("alpha", self.alpha, minimum=0.0, strict_minimum=True)
        elif self.num_clients is not None:
            raise InvalidArgument(
                "num_clients",
                f"num_clients applies to the category_field split; with "
                f"user_field={self.user_field!r} every user is a client. Leave it unset",
            )
        if self.test_fraction is not None:
            if self.test_path is not None:
                raise InvalidArgument("test_fraction", "give test_path or test_fraction, not both")
            check_real(
                "test_fraction",
                self.test_fraction,
                minimum=0.0,
                maximum=1.0,
                strict_minimum=True,
                strict_maximum=True,
            )
        from fedjaxsim.data.instructions import check_template

        for key in ("prompt_template", "prompt_template_no_input"):
            if getattr(self, key) is not None:
                try:
                    check_template(getattr(self, key), key)
                except ValueError as error:
                    raise InvalidArgument(key, str(error)) from None
        _check_file("path", self.path, "the train JSONL file is expected")
        _check_file("test_path", self.test_path, "the test JSONL file is expected")
        _check_tokenizer("tokenizer", self.tokenizer)
        if self.user_field is not None:
            from fedjaxsim.data.instructions import count_users

            try:
                count_users(self.path, self.user_field)
            except (OSError, ValueError) as error:
                raise InvalidArgument("path", str(error)) from None

    def population(self) -> int:
        if self.category_field is not None:
            return self.num_clients
        from fedjaxsim.data.instructions import count_users

        # An upper bound: a user whose every record is cut to nothing is dropped at load.
        return count_users(self.path, self.user_field)

    def load(self, seed: int, progress: bool) -> FederatedDataset:
        del progress
        from fedjaxsim.data.instructions import load_instructions

        return load_instructions(
            self.path,
            tokenizer=self.tokenizer,
            sequence_length=self.sequence_length,
            user_field=self.user_field,
            category_field=self.category_field,
            num_clients=self.num_clients,
            alpha=self.alpha,
            test_path=self.test_path,
            test_fraction=self.test_fraction,
            instruction_field=self.instruction_field,
            input_field=self.input_field,
            response_field=self.response_field,
            train_on_prompt=self.train_on_prompt,
            eos_token=self.eos_token,
            seed=seed,
            **{
                key: getattr(self, key)
                for key in ("prompt_template", "prompt_template_no_input")
                if getattr(self, key) is not None
            },
        )


DATA_CONFIGS = (
    DigitsData,
    FederatedEmnistData,
    TfdsData,
    ShakespeareData,
    FedCifar100Data,
    StackOverflowData,
    InstructionData,
)
