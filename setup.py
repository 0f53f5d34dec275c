"""segrec: a two-tower recommender with segment-aware retrieval.

One distribution holding the packages `trainer`, `serving` and
`beam_pipelines`. Beam workers (Dataflow) install it from this file through
`--setup_file ./setup.py`.
"""

from setuptools import find_packages, setup

# Pinned together: scann 1.4.2 is built against tensorflow 2.20, and
# tensorflow-text / tf-keras / tensorflow-serving-api must match it.
INSTALL_REQUIRES = [
    "tensorflow==2.20.*",
    "tf-keras==2.20.*",
    "tensorflow-text==2.20.*",
    "tensorflow-recommenders==0.7.7",
    "keras-nlp==0.32.*",
    "keras-hub==0.32.*",
    "scann[tf]==1.4.2",
    "apache-beam[tfrecord]==2.77.*",
    # Fast CRC32C for TFRecord writes (Beam falls back to crcmod).
    "google-crc32c>=1.5",
    "tensorflow-serving-api==2.20.*",
    # `segrec serve`: grpc.health.v1 and server reflection. 1.81 is the newest
    # line that accepts protobuf 6 (1.82+ require protobuf >= 7.35); this stack
    # (TF 2.20, grpcio 1.85) is installed and tested with protobuf 6.33.
    "grpcio-health-checking==1.81.*",
    "grpcio-reflection==1.81.*",
    # Beam's TensorFlow RunInference handler imports tensorflow_hub.
    "tensorflow-hub>=0.16,<0.17",
    # keras-hub reads the pretrained encoder's model.safetensors.
    "safetensors>=0.4",
    "numpy>=1.26,<3",
    # Beam 2.77's dataframe module (imported under IPython) supports pandas < 2.4.
    "pandas>=2.2,<2.4",
    "pyarrow>=14",
    "scikit-learn>=1.4",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "prometheus-client>=0.20",
    # `segrec frontend`: the reference web integration.
    "fastapi>=0.115",
    "uvicorn>=0.30",
]

EXTRAS_REQUIRE = {
    # Beam on Dataflow (GCS, BigQuery sinks).
    "gcp": ["apache-beam[gcp]==2.77.*"],
    # `segrec vertex submit`.
    "vertex": ["google-cloud-aiplatform>=1.60"],
    "dev": [
        "pytest>=8",
        # `make test` runs the suite in TEST_WORKERS processes, one test file per process.
        "pytest-xdist>=3.6",
        "hypothesis>=6.100",
        # The Vertex AI job spec is tested with the library's own types.
        "google-cloud-aiplatform>=1.60",
        # Notebooks are executed by the tests.
        "nbformat>=5.10",
        "nbclient>=0.10",
        "ipykernel>=6.29",
        # The frontend page is tested in Debian's headless Chromium through
        # Playwright's client (no browser download: /usr/bin/chromium).
        "playwright>=1.50",
        "httpx>=0.27",
        # The layering (.importlinter) and lint (ruff.toml), run by tests/test_architecture.py.
        "import-linter==2.16",
        "ruff==0.17.5",
    ],
}

setup(
    name="segrec",
    version="0.1.0",
    description="Two-tower recommender with segment-aware retrieval (Beam, TF, keras-hub BERT, ScaNN, TF Serving).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["trainer", "trainer.*", "serving", "serving.*", "beam_pipelines", "beam_pipelines.*"]),
    include_package_data=True,
    package_data={"serving.frontend": ["static/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["segrec=trainer.cli.main:main"]},
    license="Apache-2.0",
)
