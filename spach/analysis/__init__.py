"""Why the families differ: effective receptive fields, CKA, corruption and Fourier robustness, attention distance.

    from spach.analysis import load_subject, erf_analysis, cka_analysis, corruption_analysis, mce
    conv = load_subject(run_dir="runs/cpu-analysis/runs/conv-ms-tiny-s0-1a2b3c4d")
    erf_analysis(conv, n_images=32)           # ERF maps and high-contribution area ratios per stage
"""
from spach.analysis.attention import attention_distance_analysis, mean_distance
from spach.analysis.cka import MinibatchCKA, cka_analysis, linear_cka, unbiased_hsic_matrix
from spach.analysis.common import ImageSet, Subject, load_subject
from spach.analysis.corruptions import CORRUPTIONS, corrupt, corruption_analysis, mce
from spach.analysis.erf import erf_analysis, erf_area_ratio, input_gradient_map
from spach.analysis.fourier import band_filter, fourier_analysis, fourier_basis

__all__ = ["attention_distance_analysis", "mean_distance", "MinibatchCKA", "cka_analysis", "linear_cka",
           "unbiased_hsic_matrix", "ImageSet", "Subject", "load_subject", "CORRUPTIONS", "corrupt",
           "corruption_analysis", "mce", "erf_analysis", "erf_area_ratio", "input_gradient_map",
           "band_filter", "fourier_analysis", "fourier_basis"]
