"""Writers of the upstream checkpoint layouts, with the exact key names and the kinds of objects real files hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .reference_dinov3 import make_dinov3_state_dict, make_primus_decoder_state_dict

LABELS = {"background": 0, "liver": 1, "tumour": 2}


def plans_json(patch=(64, 64), spacing=(0.8, 0.8)) -> dict:
    return {
        "dataset_name": "Dataset117_Liver",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.5, spacing[0], spacing[1]],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "2d": {
                "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 12, "patch_size": list(patch), "median_image_size_in_voxels": [512, 512],
                "spacing": list(spacing), "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                 "arch_kwargs": {"n_stages": 7}, "_kw_requires_import": ["conv_op"]},
                "batch_dice": True,
            },
            "2d_896": {"inherits_from": "2d", "patch_size": [896, 896],
                       "spacing": [spacing[0] * 512 / 896, spacing[1] * 512 / 896]},
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1877.0, "mean": 99.4, "median": 101.0, "min": -1063.0,
                  "percentile_00_5": -17.0, "percentile_99_5": 198.0, "std": 36.5}},
    }


def dataset_json() -> dict:
    return {"channel_names": {"0": "CT"}, "labels": dict(LABELS), "numTraining": 131, "file_ending": ".nii.gz",
            "licence": "CC-BY-SA 4.0"}


def nnunet_checkpoint(encoder: dict, decoder: dict, trainer: str, plans: dict, fold: int) -> dict:
    """What nnU-Net v2's trainer saves: weights plus numpy scalars, a torch.device, scaler and optimiser state."""
    weights = {f"dino_encoder.{k}": v for k, v in encoder.items()}
    weights.update({f"up_projection.{k}": v for k, v in decoder.items()})
    return {
        "network_weights": weights,
        "optimizer_state": {"state": {0: {"step": torch.tensor(250000.0), "exp_avg": torch.zeros(3)}},
                            "param_groups": [{"lr": 0.0, "betas": (0.9, 0.98), "weight_decay": 0.05, "params": [0]}]},
        "grad_scaler_state": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                              "growth_interval": 2000, "_growth_tracker": 17},
        "logging": {"mean_fg_dice": [np.float64(0.71), np.float64(0.74)], "ema_fg_dice": [np.float64(0.7)],
                    "train_losses": [np.float32(-0.5)], "val_losses": [np.float32(-0.4)],
                    "lrs": [0.0003], "epoch_start_timestamps": [1.7e9], "epoch_end_timestamps": [1.7e9 + 100]},
        "_best_ema": np.float64(0.8134),
        "current_epoch": 1000,
        "init_args": {"plans": plans, "configuration": "2d", "fold": fold, "dataset_json": dataset_json(),
                      "unpack_dataset": True, "device": torch.device("cuda")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": (0, 1),
    }


def write_nnunet_folder(root: Path, trainer="meddinov3_base_primus_multiscale_Trainer", configuration="2d",
                        folds=(0, 1), embed_dim=96, depth=4, num_heads=2, n_reg=4, qkv_bias=False,
                        multiscale=True, num_classes=3, seed=0, checkpoint_name="checkpoint_final.pth"):
    """A results folder `Dataset117_Liver/<Trainer>__nnUNetPlans__<configuration>/` with real-looking files."""
    folder = root / "Dataset117_Liver" / f"{trainer}__nnUNetPlans__{configuration}"
    folder.mkdir(parents=True)
    plans = plans_json()
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json(), indent=2))
    weights = []
    n_maps = 4 if multiscale else 1
    for fold in folds:
        enc = make_dinov3_state_dict(embed_dim, depth, num_heads, n_reg=n_reg, qkv_bias=qkv_bias, seed=seed + fold)
        dec = make_primus_decoder_state_dict(embed_dim * n_maps, num_classes, seed=seed + 100 + fold)
        (folder / f"fold_{fold}").mkdir()
        torch.save(nnunet_checkpoint(enc, dec, trainer, plans, fold), folder / f"fold_{fold}" / checkpoint_name)
        weights.append((enc, dec))
    return folder, weights


def write_official_pretrained(path: Path, embed_dim=96, depth=4, num_heads=2, seed=0) -> dict:
    """The MedDINOv3 `model.pth` layout: {'teacher': {'backbone.*', 'dino_head.*', 'ibot_head.*'}}."""
    enc = make_dinov3_state_dict(embed_dim, depth, num_heads, n_reg=4, seed=seed)
    teacher = {f"backbone.{k}": v for k, v in enc.items()}
    teacher.update({"dino_head.mlp.0.weight": torch.randn(32, embed_dim), "dino_head.mlp.0.bias": torch.zeros(32),
                    "dino_head.last_layer.weight_g": torch.ones(64, 1), "dino_head.last_layer.weight_v": torch.randn(64, 16),
                    "ibot_head.mlp.0.weight": torch.randn(32, embed_dim), "ibot_head.last_layer.weight": torch.randn(64, 16)})
    torch.save({"teacher": teacher}, path)
    return enc


def write_meta_dinov3(path: Path, embed_dim=96, depth=4, num_heads=2, seed=0) -> dict:
    """Meta's DINOv3 backbone layout: unwrapped, qkv bias with a key-bias mask, 4 storage tokens."""
    enc = make_dinov3_state_dict(embed_dim, depth, num_heads, n_reg=4, qkv_bias=True, mask_k_bias=True, seed=seed)
    torch.save(enc, path)
    return enc
