"""What ``tools/bench.py`` measures, as a library.

    measure.py    device-synchronised step timing, peak memory, the bf16 matmul peak, and a
                  profile of the step: device busy and idle time, the host's waits
    flops.py      training FLOPs of one image, counted by fvcore on the method's model
    reference.py  the official code's way of writing the same step (the same-run baseline)
    pipeline.py   the input pipeline's throughput (``--data_only``)
"""
