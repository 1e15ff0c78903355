"""decoders."""
from vlzoo.decoders.box import BoxDecoder, BoxEncoder, box_cycle_losses, box_losses  # noqa: E402,F401
from vlzoo.decoders.keypoints import AttentionRefinementHead, PointDescriptor, QueryPooling, box_projection_loss, extract_keypoints, interior_point, text_to_image_attention  # noqa: E402,F401
from vlzoo.decoders.prompt import PromptMLP, TriggerImageAttention, mask_losses  # noqa: E402,F401
from vlzoo.decoders.heatmap import box_heatmap_targets, decode_boxes, find_peaks, gaussian_heatmap_targets, heatmap_focal_loss, refine_subpixel  # noqa: E402,F401
from vlzoo.decoders.aligner import AlignerOutput, ConvAligner, DenseAligner  # noqa: E402,F401
from vlzoo.decoders.sam import SAM_DECODER_VARIANTS, SamMaskDecoder  # noqa: E402,F401
