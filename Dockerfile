# A Beam SDK worker image with groundforge installed. Build it from the repository root (the
# package) and push it where the workers can pull it:
#   docker build -t REGISTRY/groundforge-worker:0.1.0 .
# Then run with it instead of staging the wheel at every submission:
#   Dataflow:     --sdk_container_image=REGISTRY/groundforge-worker:0.1.0
#   Flink, Spark: --environment_type=DOCKER --environment_config=REGISTRY/groundforge-worker:0.1.0
# The Python and Beam versions must be those of the machine that submits the job
# (--build-arg PYTHON_VERSION=3.12, for one).
ARG PYTHON_VERSION=3.11
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}

ARG BEAM_VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# torch first, from PyTorch's CPU index: PyPI's Linux wheel is the CUDA build (several GB), and
# groundforge's own torch requirement is met once this is installed.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

COPY . /tmp/groundforge

# The constraints keep the image's Beam and the CPU torch as they are while groundforge's other
# dependencies install; the import fails the build if anything is missing.
RUN printf '%s\n' "apache-beam==${BEAM_VERSION}" "torch==${TORCH_VERSION}" > /tmp/constraints.txt \
    && pip install --no-cache-dir --constraint /tmp/constraints.txt /tmp/groundforge \
    && rm -rf /tmp/groundforge /tmp/constraints.txt \
    && python -c "import groundforge.pipelines.kvg"
