from setuptools import find_packages, setup

setup(
    name="data2vec-pipeline",
    version="0.1.0",
    description="Open, scalable data2vec pretraining: WebDataset shards -> DeepSpeed ZeRO-3 + megatron-core TP",
    packages=find_packages(include=["pipeline", "pipeline.*", "data_prep", "data_prep.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torchaudio pins torch exactly and has no release for newer torch: keep the pair together
        "torch==2.9.1",
        "torchaudio==2.9.1",
        "deepspeed>=0.19,<0.20",
        "megatron-core>=0.16,<0.17",
        "webdataset>=1.0,<2",
        "sentencepiece>=0.2",
        "pyyaml>=6",
        "pillow>=10",
        "tqdm>=4.60",
        "tensorboard>=2.15",
        "numpy",
        "soundfile>=0.12",  # audio decoding (libsndfile: FLAC/WAV/OGG); torchaudio only resamples
    ],
    extras_require={
        # transformers: the Data2Vec models our backbones are tested against (and the benchmark peer);
        # torchvision: the ColorJitter / RandomResizedCrop our vision augmentation is tested against
        "test": ["pytest>=8", "pytest-timeout>=2", "transformers>=4.40", "torchvision==0.24.1"],
        # transformers: export to / start from HF Data2Vec directories (python -m pipeline.export --format hf,
        # init.from=DIR); safetensors comes with it
        "hf": ["transformers>=4.40"],
        # scikit-learn: the handwritten digits bench/bench_probe.py probes vision on (sklearn.datasets.load_digits,
        # shipped inside the wheel); the speech bench also needs Debian's espeak-ng (apt-get install espeak-ng)
        "bench": ["scikit-learn>=1.3"],
    },
    entry_points={"console_scripts": ["d2v-train=pipeline.train:main", "d2v-prep-images=data_prep.images:main"]},
)
